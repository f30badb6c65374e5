from dpkern.cli import main

raise SystemExit(main())
