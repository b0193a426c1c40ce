from vlmfast.cli import main

raise SystemExit(main())
