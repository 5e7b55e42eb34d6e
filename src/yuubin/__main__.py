"""`python -m yuubin` runs the same command as `yuubin`."""

from yuubin.cli import main

raise SystemExit(main())
