"""Run the example DAG once with ``dag.test()`` for a logical date; print its state and XCom as the last line.

    python tests_airflow/run_dag.py 2024-06-30
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
from nightly_dag import dag  # the DAGs folder (jobs/airflow) is on sys.path, as Airflow puts it

day = datetime.strptime(sys.argv[1], "%Y-%m-%d").replace(tzinfo=UTC)
run = dag.test(logical_date=day)
with create_session() as session:
    xcom = session.query(XComModel).filter_by(dag_id=dag.dag_id, run_id=run.run_id, task_id="generate").all()
    values = {x.key: x.value for x in xcom}
print(json.dumps({"state": str(run.state), "xcom": values}, default=str))
