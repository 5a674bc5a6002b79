import sys

from vision_peft.cli import main

sys.exit(main())
