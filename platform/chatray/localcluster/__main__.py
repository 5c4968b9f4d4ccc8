"""``python -m chatray.localcluster start|stop|add-worker``: what cluster/local/*.sh run."""

import sys

from chatray.localcluster.commands import main

sys.exit(main())
