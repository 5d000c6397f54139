from northstar.cli import main

raise SystemExit(main())
