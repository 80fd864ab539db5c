"""Preference training entry point.

    accelerate launch train/train.py --config train/configs/sdxl_dpo.yaml [key=value ...]

All logic lives in `diffalign.training`; this file only parses arguments.
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from diffalign.training.cli import main

    sys.exit(main())
