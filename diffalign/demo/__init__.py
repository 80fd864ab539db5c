"""The Gradio demo (`diffalign demo`, `demos/app.py`): Compare, Personalize and Benchmark tabs.

`build_app(DemoConfig(...)) -> gr.Blocks`; gradio is imported only when the app is built.
"""

from diffalign.demo.config import DemoConfig

__all__ = ["DemoConfig", "build_app", "launch"]


def build_app(config: DemoConfig):
    from diffalign.demo.app import build_app as _build

    return _build(config)


def launch(demo, config: DemoConfig, **kwargs):
    from diffalign.demo.app import launch as _launch

    return _launch(demo, config, **kwargs)
