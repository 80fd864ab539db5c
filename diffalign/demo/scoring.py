"""What the demo writes under each image: reward scores and, for toy-world prompts, the exact GenEval verdict."""

from __future__ import annotations

import ast
import logging
import re
import threading

logger = logging.getLogger(__name__)

TOY_REWARD = "toy_clip"  # the trained toy-world CLIP reward, once the toy world registers it
TOY_GENEVAL_REWARD = "toy_geneval"  # the exact checker as a graded reward (diffalign.toyworld.toy_rewards)


def parse_reward_spec(spec: str) -> tuple[str, dict]:
    """'clip_score:model_name=ViT-L-14,pretrained=openai' -> ('clip_score', {...}); values parse as Python literals."""
    spec = spec.strip()
    name, _, rest = spec.partition(":")
    if not name:
        raise ValueError(f"reward spec {spec!r} has no name; write NAME or NAME:key=value,key=value")
    kwargs = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"reward spec {spec!r}: {item!r} is not key=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()  # a plain string (a path, a model name)
    return name, kwargs


def _register_toy_rewards() -> None:
    """The toy world registers its rewards when its modules are imported (those that exist)."""
    import importlib
    import importlib.util

    for mod in ("diffalign.toyworld.toy_rewards", "diffalign.toyworld.rewards", "diffalign.toyworld.toy_clip"):
        try:
            if importlib.util.find_spec(mod) is not None:
                importlib.import_module(mod)
        except ImportError as e:
            logger.warning("could not import %s: %s", mod, e)


def default_reward_specs(model_kind: str = "toy") -> tuple[list[list[str]], list[str]]:
    """The rewards shown when `--rewards` is not given: only what builds offline.

    Returns (slots, notices); each slot lists alternatives, and the first that loads is shown:
    - toy/tiny models: `toy_geneval` (the exact checker as a graded reward; toy-world prompts only);
    - a CLIP reward: `toy_clip` (the toy world's trained CLIP) when it is registered and its weights are
      there, else `clip_score` on the tiny open_clip config with RANDOM weights, said plainly.
    """
    try:
        from diffalign import rewards
    except ImportError as e:  # pragma: no cover - the package ships rewards
        return [], [f"No reward models: diffalign.rewards does not import ({e})."]
    _register_toy_rewards()
    names = rewards.available()
    slots, notices = [], []
    if model_kind in ("toy", "tiny") and TOY_GENEVAL_REWARD in names:
        slots.append([TOY_GENEVAL_REWARD])
    clip = [TOY_REWARD] if TOY_REWARD in names else []
    if "clip_score" in names:
        # torchmetrics form (100 * cos): the hessel form clamps a random model's negative cosines to 0.
        clip.append(f"clip_score:model_name='{rewards.TINY_CLIP}',random_init=True,form='torchmetrics'")
    if clip:
        slots.append(clip)
    if not slots:
        notices.append("No reward models are shown: none in the registry builds offline. Pass `--rewards NAME` to add one.")
    return slots, notices


RANDOM_CLIP_NOTICE = (
    "Reward `clip_score (random)` is the tiny open_clip config `{name}` with RANDOM weights (nothing is "
    "downloaded): its numbers show the plumbing, not quality. Pass `--rewards` for real reward models "
    "(e.g. `--rewards pickscore clip_score:model_name=ViT-L-14,pretrained=openai`)."
)


def _label(name: str, kwargs: dict) -> str:
    if kwargs.get("random_init"):
        return f"{name} (random)"
    return name


class Scorer:
    """Loads the chosen reward models once; scores images; gives GenEval verdicts."""

    def __init__(self, reward_specs: list[str] | None, device, geneval: bool = True, model_kind: str = "toy"):
        self.notices: list[str] = []
        self.rewards = []
        self._specs: list[tuple[str, str, dict]] = []
        if reward_specs is None:
            slots, self.notices = default_reward_specs(model_kind)
            for alternatives in slots:
                for spec in alternatives:
                    try:
                        self._load(spec, device)
                        break
                    except Exception as e:  # a default that does not build here is left out, and the page says so
                        self.notices.append(f"Default reward `{spec.split(':')[0]}` did not load ({type(e).__name__}: {e}).")
        else:
            _register_toy_rewards()  # so `--rewards toy_geneval` / `toy_clip` resolve too
            for spec in reward_specs:
                if spec.strip().lower() != "none":
                    self._load(spec, device)  # a reward the user named must build: errors propagate
            if not self.rewards:
                self.notices.append("No reward models are shown (`--rewards none`).")
        if any(kwargs.get("random_init") for _, _, kwargs in self._specs):
            from diffalign.rewards import TINY_CLIP

            self.notices.append(RANDOM_CLIP_NOTICE.format(name=TINY_CLIP))
        self.lock = threading.Lock()
        self.geneval = geneval
        self.model_kind = model_kind
        self._detector = None
        self._toy_index = None
        self.geneval_unavailable = self._geneval_missing()

    def _load(self, spec: str, device) -> None:
        from diffalign import rewards

        name, kwargs = parse_reward_spec(spec)
        model = rewards.load(name, **{"device": device, **kwargs})  # KeyError / ValueError name the problem
        self.rewards.append((_label(name, kwargs), model))
        self._specs.append((name, spec, kwargs))

    @property
    def reward_names(self) -> list[str]:
        return [label for label, _ in self.rewards]

    def score(self, images, prompts) -> tuple[list[dict[str, float | None]], dict[str, str]]:
        """Per image {reward: score}; a reward that cannot judge these prompts (e.g. toy_geneval on a
        non-toy prompt) gets None, with its reason in the second return value."""
        out: list[dict[str, float | None]] = [{} for _ in images]
        errors: dict[str, str] = {}
        with self.lock:
            for label, model in self.rewards:
                try:
                    values = model.score(list(images), list(prompts)).float().cpu().tolist()
                except ValueError as e:
                    values = [None] * len(out)
                    errors[label] = str(e)
                for d, v in zip(out, values):
                    d[label] = None if v is None else float(v)
        return out, errors

    # ------------------------------------------------------------------ GenEval
    def _geneval_missing(self) -> str | None:
        if not self.geneval:
            return "GenEval verdicts are switched off (--no_geneval)."
        if self.model_kind == "pretrained":
            return ("the toy detector reads toy-world scenes only; evaluate a real model with "
                    "`diffalign geneval` and a real detector")
        try:
            from diffalign.evaluation.geneval import score_detections  # noqa: F401
        except ImportError as e:
            return f"GenEval rules are not importable ({e})"
        try:
            from diffalign.toyworld import (
                detector,  # noqa: F401
                scenes,  # noqa: F401
            )
        except ImportError as e:
            return f"the toy-world detector is not importable ({e})"
        return None

    def toy_metadata(self, prompt: str) -> dict | None:
        """The toy-world GenEval metadata row whose prompt this is, or None."""
        if self._toy_index is None:
            from diffalign.toyworld import scenes

            self._toy_index = {_normalise(r["prompt"]): r for t in scenes.TASKS for r in scenes.all_rows(t)}
        return self._toy_index.get(_normalise(prompt))

    def _load_detector(self):
        if self._detector is None:
            try:
                from diffalign.evaluation.detectors import load_detector

                self._detector = load_detector("toyworld")
            except ImportError:
                # The registry is not there (yet): the toy detector is the same object either way.
                from diffalign.toyworld.detector import ToyWorldDetector

                self._detector = ToyWorldDetector()
        return self._detector

    def verdict(self, image, prompt: str) -> dict:
        """{"available", "task", "correct", "reason"}; reason explains a failure or why there is no verdict."""
        if self.geneval_unavailable:
            return {"available": False, "task": None, "correct": None, "reason": self.geneval_unavailable}
        row = self.toy_metadata(prompt)
        if row is None:
            return {
                "available": False, "task": None, "correct": None,
                "reason": "not a toy-world prompt (e.g. 'a photo of a red circle and a blue square'); try an example",
            }
        from diffalign.evaluation.geneval import score_detections

        names = sorted({c["class"] for c in row.get("include", []) + row.get("exclude", [])})
        with self.lock:
            detections = self._load_detector().detect(image, names)
        correct, reason = score_detections(row, detections)
        return {"available": True, "task": row["tag"], "correct": bool(correct), "reason": reason}


def _normalise(prompt: str) -> str:
    return re.sub(r"\s+", " ", prompt.strip().lower()).rstrip(".")


def format_card(title: str, rewards: dict[str, float], verdict: dict, reward_note: str = "") -> str:
    """The markdown under an image."""
    lines = [f"**{title}**"]
    if rewards:
        lines.append("rewards: " + ", ".join(f"`{k}` {'n/a' if v is None else f'{v:.4f}'}" for k, v in rewards.items()))
    else:
        lines.append("rewards: none" + (f" ({reward_note})" if reward_note else ""))
    if verdict["available"]:
        mark = "correct" if verdict["correct"] else f"wrong: {verdict['reason']}"
        lines.append(f"GenEval ({verdict['task']}): {mark}")
    else:
        lines.append(f"GenEval: n/a ({verdict['reason']})")
    return "  \n".join(lines)
