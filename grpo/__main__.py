import sys

from grpo.commands.cli import main

sys.exit(main())
