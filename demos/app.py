"""The diffalign Gradio demo. Same as `diffalign demo`; see docs/demo.md.

    python demos/app.py                       # toy world on CPU (random tiny model if the toy checkpoint is absent)
    python demos/app.py --base stabilityai/stable-diffusion-xl-base-1.0 --lora out/lora --device cuda
"""

import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from diffalign.demo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
