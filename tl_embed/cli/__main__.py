"""``python -m tl_embed.cli``: the same as the ``tl-embed`` command."""

import sys

from .main import main

sys.exit(main())
