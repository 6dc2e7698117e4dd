from batch.simulator import main

raise SystemExit(main())
