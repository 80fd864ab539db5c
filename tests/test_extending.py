"""docs/extending.md: its Python blocks run, in order, in one namespace (so the page stays true)."""

import os
import re

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "extending.md")


def test_the_extension_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", open(DOC, encoding="utf-8").read(), flags=re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)  # the training example writes outputs/
    from diffalign import objectives, rewards
    from diffalign.rewards import base

    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, DOC, "exec"), namespace)
        assert "best_vs_rest" in objectives.REGISTRY and "saturation" in rewards.available()
    finally:  # the registries are process-wide: leave them as the other tests expect
        objectives.REGISTRY.pop("best_vs_rest", None)
        base._REGISTRY.pop("saturation", None)
