"""Record the machine a benchmark ran on: card, driver, library versions, date."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform


def report() -> dict:
    import torch

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
    for name in ("torch", "triton", "diffusers", "transformers", "accelerate", "peft", "open_clip"):
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception as exc:  # noqa: BLE001 - report what is missing, do not fail the suite
            info[name] = f"unavailable ({type(exc).__name__})"
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    info = report()
    with open(args.out, "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
