from peftbench.cli import main

raise SystemExit(main())
