"""`python3 -m images.deb [--out DIR]`: build the Debian package (see images/deb/build.py)."""

import sys

from images.deb.build import main

sys.exit(main())
