"""A nightly promptmill job in Airflow: prompts in, a Parquet file of answers out per logical date,
then that day's report (Markdown, beside the output) from ``promptmill report``.

It runs on the built-in simulator (no key, no network). For a real API, set
``api.base_url`` in the job file, create an Airflow connection holding the key
as its password and pass ``conn_id=`` to the operator.

Its files, so the same DAG runs from a checkout and in the tests: the job
file ``PROMPTMILL_NIGHTLY_JOB``, the input ``PROMPTMILL_NIGHTLY_INPUT`` and the
output folder ``PROMPTMILL_NIGHTLY_OUT`` (default: this repository's ones, and out/nightly),
the connection holding the key ``PROMPTMILL_NIGHTLY_CONN`` (default: none, the simulator needs none),
and the task's retries ``PROMPTMILL_NIGHTLY_RETRIES`` (default 2, five minutes apart).
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta
from pathlib import Path

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

from batch.airflow import PromptmillOperator

REPO = Path(__file__).resolve().parents[2]
JOB = os.environ.get("PROMPTMILL_NIGHTLY_JOB", str(REPO / "jobs" / "airflow" / "nightly.toml"))
INPUT = os.environ.get("PROMPTMILL_NIGHTLY_INPUT", str(REPO / "sample_data" / "prompts.jsonl"))
OUT = os.environ.get("PROMPTMILL_NIGHTLY_OUT", str(REPO / "out" / "nightly"))
RETRIES = int(os.environ.get("PROMPTMILL_NIGHTLY_RETRIES", "2"))

with DAG(
    dag_id="promptmill_nightly",
    schedule="@daily",
    start_date=datetime(2024, 1, 1),
    catchup=False,
    default_args={"retries": RETRIES, "retry_delay": timedelta(minutes=5)},
) as dag:
    generate = PromptmillOperator(
        task_id="generate",
        job=JOB,
        input=INPUT,
        output=OUT + "/nightly-{{ ds }}.parquet",  # a cleared and rerun task resumes into the same file
        overrides={"max_failed_fraction": 0.01},
        conn_id=os.environ.get("PROMPTMILL_NIGHTLY_CONN"),
    )
    # The day's report, from the output the task above wrote (the task's XCom names it).
    report = BashOperator(
        task_id="report",
        bash_command=(
            f"{sys.executable} -m batch report "
            "{{ ti.xcom_pull(task_ids='generate')['output'] }} --format md "
            "-o {{ ti.xcom_pull(task_ids='generate')['output'] }}.report.md"
        ),
    )
    generate >> report
