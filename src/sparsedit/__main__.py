"""``python -m sparsedit`` (used under ``torchrun``)."""

from sparsedit.cli import main

raise SystemExit(main())
