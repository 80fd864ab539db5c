"""Which server files a demo client may name: every client-supplied path is confined to allowed roots.

The roots are the folders given on the command line (results folders, LoRA folders) and, for results
files, gradio's upload folder. A path is accepted when, with symlinks resolved, it lies inside a root.
Refusals never say whether the path exists, so the demo is not a file-existence oracle either.
"""

from __future__ import annotations

import os

from diffalign.demo.validation import DemoInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def upload_folder() -> str:
    """gradio's upload cache (GRADIO_TEMP_DIR, else <tmp>/gradio), resolved."""
    from gradio.utils import get_upload_folder

    return os.path.realpath(get_upload_folder())


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives
        return False


class PathPolicy:
    """Allowed roots for one kind of file (`what`, e.g. "results folder"), and the check against them."""

    def __init__(self, what: str, roots: list[str]):
        self.what = what
        # A root given as a file (a results.jsonl, a .safetensors) allows its folder.
        self.roots = []
        for r in roots:
            real = os.path.realpath(os.path.expanduser(r))
            real = os.path.dirname(real) if os.path.isfile(real) else real
            if real not in self.roots:
                self.roots.append(real)

    def allows(self, path: str) -> bool:
        return any(_inside(os.path.realpath(path), root) for root in self.roots)

    def refusal(self, path: str) -> DemoInputError:
        if not self.roots:
            return DemoInputError(f"this demo serves no {self.what}s from client paths; the operator adds folders on the command line")
        return DemoInputError(
            f"{self.what} {path!r} is not under a folder this demo serves; give a path inside one of the configured folders"
        )

    def resolve(self, path) -> str:
        """The real server path for a client-supplied one, or a DemoInputError; does not check existence.

        A relative path is taken under each root in turn (the first that exists wins); an absolute one
        must already lie inside a root. `..` components are refused outright.
        """
        text = str(path if path is not None else "").strip()
        if not text:
            raise DemoInputError(f"the {self.what} path is empty")
        if "\x00" in text or ".." in text.replace("\\", "/").split("/"):
            raise DemoInputError(f"{self.what} {text!r} may not contain '..'; give a path inside a configured folder")
        if os.path.isabs(text):
            if self.allows(text):
                return os.path.realpath(text)
            raise self.refusal(text)
        inside = [os.path.realpath(os.path.join(root, text)) for root in self.roots]
        inside = [p for p, root in zip(inside, self.roots) if _inside(p, root)]  # symlinks may point out
        if not inside:
            raise self.refusal(text)
        return next((p for p in inside if os.path.exists(p)), inside[0])


def image_file(policy: PathPolicy, candidates: list[str]) -> tuple[str | None, bool]:
    """(the first candidate that is an allowed image file, or None and whether any candidate was refused)."""
    refused = False
    for c in candidates:
        if not policy.allows(c) or not c.lower().endswith(IMAGE_SUFFIXES):
            refused = True
            continue
        if os.path.isfile(c):
            return os.path.realpath(c), False
    return None, refused
