"""GenEval in-process: `python eval/geneval.py generate|evaluate|summary ...` (same as `diffalign geneval ...`).

See docs/geneval.md.
"""

import sys

from diffalign.evaluation.geneval.cli import main

if __name__ == "__main__":
    sys.exit(main())
