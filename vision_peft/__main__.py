"""``python -m vision_peft …``: the command line (:mod:`vision_peft.cli`)."""

import sys

from vision_peft.cli import main

sys.exit(main())
