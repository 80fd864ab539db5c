"""The Gradio app: `build_app(config) -> gr.Blocks` with tabs Compare, Personalize and Benchmark.

Named API endpoints (for `gradio_client`): `/compare`, `/pairs`, `/personalize`, `/benchmark`.
Every handler checks its input and turns a bad value into a visible `gr.Error`; the server keeps serving.
"""

from __future__ import annotations

import functools
import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry

import gradio as gr  # noqa: E402

from diffalign.demo import benchmark as bench  # noqa: E402
from diffalign.demo.config import DemoConfig  # noqa: E402
from diffalign.demo.models import DemoModels  # noqa: E402
from diffalign.demo.paths import PathPolicy, upload_folder  # noqa: E402
from diffalign.demo.personalize import CHOICES, NUM_PAIRS, Personalizer  # noqa: E402
from diffalign.demo.scoring import Scorer, format_card  # noqa: E402
from diffalign.demo.validation import (  # noqa: E402
    DemoInputError,
    check_float,
    check_guidance,
    check_prompt,
    check_seed,
    check_size,
    check_steps,
    open_image_upload,
)

logger = logging.getLogger(__name__)

# Tiny models make 64 px images: show them large, with crisp pixels.
MAX_USER_SCALE = 3.0

CSS = """
.pixelated img { image-rendering: pixelated; width: 100% !important; height: 100% !important; object-fit: contain; }
"""


def user_errors(fn):
    """Bad input -> gr.Error with the message; anything else -> gr.Error naming the failure (and a log)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (DemoInputError, FileNotFoundError, ValueError) as e:
            logger.warning("bad input to %s: %s", fn.__name__, e)
            raise gr.Error(str(e), title="Bad input") from None
        except Exception as e:
            logger.exception("request failed")
            raise gr.Error(f"{type(e).__name__}: {e}", title="Generation failed") from e

    return wrapper


def example_prompts(model_kind: str) -> list[str]:
    """GenEval-style examples: one toy-world prompt per task (toy/tiny models), else official GenEval prompts."""
    if model_kind in ("toy", "tiny"):
        from diffalign.toyworld.scenes import TASKS, load_eval_set

        rows = load_eval_set()
        return [next(r["prompt"] for r in rows if r["tag"] == t) for t in TASKS]
    from diffalign.evaluation.geneval import load_metadata

    rows, seen, out = load_metadata(), set(), []
    for r in rows:
        if r["tag"] not in seen:
            seen.add(r["tag"])
            out.append(r["prompt"])
    return out


class DemoState:
    """Loaded once per app: models, reward scorer, personalizer, limits."""

    def __init__(self, config: DemoConfig):
        self.config = config
        self.models = DemoModels(config.base, lora=config.lora, device=config.device, dtype=config.dtype,
                                 max_loras=config.max_loras)
        # Client-typed paths: LoRAs from --lora's folder and --lora_dir; results (and their images) from
        # --results, --results_root and the uploads.
        self.lora_paths = PathPolicy("LoRA", ([config.lora] if config.lora else []) + list(config.lora_dirs))
        self.results_paths = PathPolicy("results folder", [*config.results_dirs, *config.results_roots, upload_folder()])
        self.scorer = Scorer(config.rewards, self.models.device, geneval=config.geneval, model_kind=self.models.source.kind)
        self.personalizer = Personalizer(self.models, config.user_adapter, config.user_encoder)
        native = self.models.native_size
        self.size_step = self.models.size_multiple
        self.default_size = check_size(config.default_size or min(max(native, config.min_size), config.max_size),
                                       config.min_size, config.max_size, self.size_step)
        self.default_steps = check_steps(config.default_steps or min(20, config.max_steps), config.max_steps)
        self.notices = list(self.models.source.notices)
        if self.models.default_lora is None:
            self.notices.append(
                "No aligned model: pass `--lora PATH` (a LoRA written by `diffalign train`), or `--lora_dir DIR` and "
                "enter a path under it. Until then the Compare tab shows the base model only."
            )
        self.notices += self.scorer.notices + self.personalizer.notices
        if self.personalizer.missing:
            self.notices.append(f"Personalize tab disabled: {self.personalizer.missing}.")

    # ------------------------------------------------------------------ shared checks
    def settings(self, prompt, seed, steps, size, guidance):
        c = self.config
        return (
            check_prompt(prompt, c.max_prompt_chars),
            check_seed(seed),
            check_steps(steps, c.max_steps),
            check_size(size, c.min_size, c.max_size, self.size_step),
            check_guidance(guidance, c.max_guidance),
        )

    def card(self, title, image, prompt):
        rewards, errors = self.scorer.score([image], [prompt]) if self.scorer.rewards else ([{}], {})
        verdict = self.scorer.verdict(image, prompt)
        info = {"rewards": rewards[0], "geneval": verdict}
        if errors:
            info["reward_errors"] = errors
        return format_card(title, rewards[0], verdict), info

    # ------------------------------------------------------------------ Compare
    def compare(self, prompt, seed, steps, size, guidance, lora, progress=gr.Progress()):  # noqa: B008 (gradio's way to ask for a progress tracker)
        prompt, seed, steps, size, guidance = self.settings(prompt, seed, steps, size, guidance)
        lora = (lora or "").strip()
        lora_file = self.models.load_lora(self.lora_paths.resolve(lora)) if lora else None
        total = steps * (2 if lora_file else 1)
        progress((0, total), desc="base model", unit="steps")
        base = self.models.generate(prompt, seed, steps, size, guidance,
                                    on_step=lambda s: progress((s, total), desc="base model", unit="steps"))
        base_md, base_info = self.card(f"base · {self.models.source.spec}", base, prompt)
        aligned, aligned_md, aligned_info = None, "**aligned**: no LoRA given (`--lora` or Settings)", None
        if lora_file:
            aligned = self.models.generate(
                prompt, seed, steps, size, guidance, lora=lora_file,
                on_step=lambda s: progress((steps + s, total), desc="aligned model", unit="steps"),
            )
            name = os.path.join(os.path.basename(os.path.dirname(lora_file)), os.path.basename(lora_file))
            aligned_md, aligned_info = self.card(f"aligned · {name}", aligned, prompt)
        details = {
            "prompt": prompt, "seed": seed, "steps": steps, "size": size, "guidance": guidance,
            "base_model": self.models.source.spec, "lora": lora_file,
            "base": base_info, "aligned": aligned_info, "notices": self.notices,
        }
        return base, base_md, aligned, aligned_md, details

    # ------------------------------------------------------------------ Personalize
    def _need_personalizer(self):
        if self.personalizer.missing:
            raise DemoInputError(f"personalization is unavailable: {self.personalizer.missing}")
        return self.personalizer

    def pairs(self, prompt, pair_seed, steps, size, guidance, progress=gr.Progress()):  # noqa: B008 (gradio's way to ask for a progress tracker)
        p = self._need_personalizer()
        prompt, pair_seed, steps, size, guidance = self.settings(prompt, pair_seed, steps, size, guidance)
        total = 2 * NUM_PAIRS
        progress((0, total), desc="pairs", unit="images")
        pairs = p.pairs(prompt, pair_seed, steps, size, guidance, on_image=lambda n: progress((n, total), desc="pairs", unit="images"))
        return [im for pair in pairs for im in pair]

    def personalize(self, prompt, pair_seed, choice_1, choice_2, choice_3, choice_4, preferred, rejected,
                    seed, steps, size, guidance, user_scale, progress=gr.Progress()):  # noqa: B008 (gradio's way to ask for a progress tracker)
        p = self._need_personalizer()
        prompt, seed, steps, size, guidance = self.settings(prompt, seed, steps, size, guidance)
        pair_seed = check_seed(pair_seed)
        scale = check_float("user scale", user_scale, 0.0, MAX_USER_SCALE)
        choices = [choice_1, choice_2, choice_3, choice_4]
        preferred, rejected = list(preferred or []), list(rejected or [])
        if len(preferred) != len(rejected):
            raise DemoInputError(
                f"uploaded {len(preferred)} preferred but {len(rejected)} rejected images; upload them in pairs, same order"
            )
        c = self.config
        uploads = [(open_image_upload(a, c.max_upload_bytes, c.max_upload_pixels),
                    open_image_upload(b, c.max_upload_bytes, c.max_upload_pixels)) for a, b in zip(preferred, rejected)]
        pairs = []
        if any(ch not in (None, "") for ch in choices):
            progress(0.0, desc="pairs")
            pairs = p.pairs(prompt, pair_seed, steps, size, guidance)
        examples = p.examples(prompt, pairs, choices, uploads)
        embedding = p.embed(examples)
        progress((0, 2 * steps), desc="base model", unit="steps")
        base = self.models.generate(prompt, seed, steps, size, guidance,
                                    on_step=lambda s: progress((s, 2 * steps), desc="base model", unit="steps"))
        mine = p.generate(prompt, embedding, seed, steps, size, guidance, scale=scale,
                          on_step=lambda s: progress((steps + s, 2 * steps), desc="for you", unit="steps"))
        base_md, base_info = self.card("base", base, prompt)
        mine_md, mine_info = self.card(f"for you · {len(examples)} examples · user scale {scale:g}", mine, prompt)
        details = {
            "prompt": prompt, "seed": seed, "steps": steps, "size": size, "pair_seed": pair_seed,
            "examples_from_pairs": sum(ch not in (None, "") for ch in choices), "examples_uploaded": len(uploads),
            "embedding_shape": list(embedding.shape), "trained_user_adapter": p.trained,
            "base": base_info, "personalized": mine_info,
        }
        return base, base_md, mine, mine_md, details, embedding

    def interpolate(self, user_a, user_b, alpha, prompt, seed, steps, size, guidance, user_scale, progress=gr.Progress()):  # noqa: B008 (gradio's way to ask for a progress tracker)
        p = self._need_personalizer()
        if user_a is None or user_b is None:
            raise DemoInputError("save two users first (build a user, then 'Save as user A' / 'Save as user B')")
        prompt, seed, steps, size, guidance = self.settings(prompt, seed, steps, size, guidance)
        emb = p.interpolate(user_a, user_b, check_float("alpha", alpha, 0.0, 1.0))
        scale = check_float("user scale", user_scale, 0.0, MAX_USER_SCALE)
        image = p.generate(prompt, emb, seed, steps, size, guidance, scale=scale,
                           on_step=lambda s: progress((s, steps), desc=f"alpha {float(alpha):.2f}", unit="steps"))
        md, _ = self.card(f"between A and B · alpha {float(alpha):.2f}", image, prompt)
        return image, md

    # ------------------------------------------------------------------ Benchmark
    def benchmark(self, folders):
        runs = bench.load_runs(folders, self.results_paths)
        headers, rows = bench.table(runs)
        import pandas as pd

        return bench.bar_figure(runs), pd.DataFrame(rows, columns=headers), gr.Dropdown(choices=[r.name for r in runs], value=runs[0].name), runs

    def failures(self, run_name, runs):
        if not runs:
            raise DemoInputError("load a results folder first")
        run = next((r for r in runs if r.name == run_name), None)
        if run is None:
            raise DemoInputError(f"unknown run {run_name!r}; pick one from the list")
        c = self.config
        gallery, shown, without_image, refused = [], 0, 0, 0
        failed = run.failures()
        for row in failed:
            if shown >= c.max_failures_shown:
                break
            path, was_refused = bench.failure_path(run, row, self.results_paths)
            if path is None:
                refused += was_refused
                without_image += not was_refused
                continue
            gallery.append((open_image_upload(path, c.max_upload_bytes, c.max_upload_pixels), bench.failure_caption(row)))
            shown += 1
        note = f"{len(failed)} failures of {len(run.rows)} images in `{run.name}`; showing {shown}"
        if run.errors:
            note += f". {run.errors} images could not be evaluated (see results.jsonl.errors.jsonl) and are not counted"
        if without_image:
            note += f"; {without_image} rows have no image file on disk"
        if refused:
            note += f"; {refused} rows name images outside the folders this demo serves (not opened)"
        return gallery, note


def build_app(config: DemoConfig, state: DemoState | None = None) -> gr.Blocks:
    """The app. Loading the models happens here (once), so a bad `--base`/`--lora` fails before serving."""
    s = state or DemoState(config)
    examples = example_prompts(s.models.source.kind)
    limits = dict(steps_max=config.max_steps, size_min=config.min_size, size_max=config.max_size)
    cache = (config.cache_max_age_s, config.cache_max_age_s)  # (how often, how old): uploads do not pile up
    with gr.Blocks(title="diffalign demo", analytics_enabled=False, delete_cache=cache) as demo:
        gr.Markdown(
            f"# diffalign: what alignment and personalization change\n"
            f"Base model: `{s.models.source.label}` ({s.models.source.kind}, {s.models.family}) on `{s.models.device}`. "
            f"Rewards: {', '.join(f'`{n}`' for n in s.scorer.reward_names) or 'none'}."
        )
        if s.notices:
            gr.Markdown("\n".join(f"- {n}" for n in s.notices), elem_id="notices")

        def settings_row(prefix):
            with gr.Accordion("Settings", open=False):
                with gr.Row():
                    seed = gr.Number(value=0, label="seed", precision=0, elem_id=f"{prefix}_seed")
                    steps = gr.Slider(1, limits["steps_max"], value=s.default_steps, step=1, label="steps")
                    size = gr.Slider(limits["size_min"], limits["size_max"], value=s.default_size, step=s.size_step, label="size (px)")
                    guidance = gr.Slider(0, config.max_guidance, value=config.default_guidance, step=0.5, label="guidance")
            return seed, steps, size, guidance

        # ------------------------------------------------------------ Compare
        with gr.Tab("Compare"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", value=examples[0], scale=5, elem_id="prompt")
                generate = gr.Button("Generate", variant="primary", scale=1, elem_id="generate")
            gr.Examples(examples=[[e] for e in examples], inputs=[prompt], label="GenEval-style prompts")
            seed, steps, size, guidance = settings_row("compare")
            lora = gr.Textbox(value=s.models.default_lora or "", label="aligned LoRA (.safetensors or folder)", elem_id="lora")
            with gr.Row():
                with gr.Column():
                    base_img = gr.Image(label="base", format="png", height=320, elem_id="base_image", elem_classes="pixelated")
                    base_md = gr.Markdown(elem_id="base_card")
                with gr.Column():
                    aligned_img = gr.Image(label="aligned", format="png", height=320, elem_id="aligned_image", elem_classes="pixelated")
                    aligned_md = gr.Markdown(elem_id="aligned_card")
            with gr.Accordion("Details (JSON)", open=False):
                details = gr.JSON(label="details")
            compare_inputs = [prompt, seed, steps, size, guidance, lora]
            compare_outputs = [base_img, base_md, aligned_img, aligned_md, details]
            generate.click(user_errors(s.compare), compare_inputs, compare_outputs, api_name="compare", concurrency_id="generate")
            prompt.submit(user_errors(s.compare), compare_inputs, compare_outputs, api_visibility="private", concurrency_id="generate")

        # ------------------------------------------------------------ Personalize
        with gr.Tab("Personalize"):
            gr.Markdown(
                "Pick the image you prefer in each pair (or upload preferred/rejected images). The user encoder turns "
                "your choices into a user embedding; the model then generates for you next to the base model."
            )
            with gr.Row():
                p_prompt = gr.Textbox(label="Prompt", value=examples[0], scale=4, elem_id="p_prompt")
                pair_seed = gr.Number(value=100, label="pair seed", precision=0, scale=1)
                show = gr.Button("Show pairs", scale=1, elem_id="show_pairs")
            p_seed, p_steps, p_size, p_guidance = settings_row("personalize")
            pair_imgs, radios = [], []
            with gr.Row():
                for i in range(NUM_PAIRS):
                    with gr.Column(min_width=200):
                        with gr.Row():
                            for side in CHOICES:
                                pair_imgs.append(gr.Image(label=f"{i + 1} {side}", format="png", height=140,
                                                          interactive=False, elem_classes="pixelated", min_width=100))
                        radios.append(gr.Radio(list(CHOICES), label=f"pair {i + 1}: preferred", elem_id=f"choice_{i + 1}"))
            with gr.Accordion("Or upload examples (preferred and rejected, in the same order)", open=False):
                with gr.Row():
                    preferred = gr.File(file_count="multiple", file_types=["image"], label="preferred images")
                    rejected = gr.File(file_count="multiple", file_types=["image"], label="rejected images")
            user_scale = gr.Slider(0, MAX_USER_SCALE, value=1.0, step=0.1, label="user scale")
            build = gr.Button("Generate for me", variant="primary", elem_id="personalize")
            with gr.Row():
                with gr.Column():
                    p_base = gr.Image(label="base", format="png", height=280, elem_classes="pixelated")
                    p_base_md = gr.Markdown()
                with gr.Column():
                    p_mine = gr.Image(label="for you", format="png", height=280, elem_classes="pixelated")
                    p_mine_md = gr.Markdown()
            with gr.Accordion("Details (JSON)", open=False):
                p_details = gr.JSON()
            current, user_a, user_b = gr.State(None), gr.State(None), gr.State(None)
            with gr.Row():
                save_a = gr.Button("Save as user A")
                save_b = gr.Button("Save as user B")
                saved_md = gr.Markdown("No users saved.")
            alpha = gr.Slider(0, 1, value=0.5, step=0.05, label="interpolate: 0 = user A, 1 = user B")
            mix = gr.Button("Generate between A and B")
            with gr.Row():
                mix_img = gr.Image(label="interpolated user", format="png", height=280, elem_classes="pixelated")
                mix_md = gr.Markdown()

            show.click(user_errors(s.pairs), [p_prompt, pair_seed, p_steps, p_size, p_guidance], pair_imgs,
                       api_name="pairs", concurrency_id="generate")
            build.click(
                user_errors(s.personalize),
                [p_prompt, pair_seed, *radios, preferred, rejected, p_seed, p_steps, p_size, p_guidance, user_scale],
                [p_base, p_base_md, p_mine, p_mine_md, p_details, current],
                api_name="personalize", concurrency_id="generate",
            )

            def save(slot_name):
                def _save(emb, a, b):
                    if emb is None:
                        raise gr.Error("build a user first ('Generate for me')", title="Bad input")
                    a, b = (emb, b) if slot_name == "A" else (a, emb)
                    return a, b, f"Saved: user A {'set' if a is not None else 'empty'}, user B {'set' if b is not None else 'empty'}."
                return _save

            save_a.click(save("A"), [current, user_a, user_b], [user_a, user_b, saved_md], api_visibility="private")
            save_b.click(save("B"), [current, user_a, user_b], [user_a, user_b, saved_md], api_visibility="private")
            mix.click(user_errors(s.interpolate),
                      [user_a, user_b, alpha, p_prompt, p_seed, p_steps, p_size, p_guidance, user_scale],
                      [mix_img, mix_md], api_name="interpolate", concurrency_id="generate")

        # ------------------------------------------------------------ Benchmark
        with gr.Tab("Benchmark"):
            gr.Markdown("GenEval results folders (each holds `results.jsonl`), one per line. Bars share one scale.")
            folders = gr.Textbox(value="\n".join(config.results_dirs), lines=3, label="results folders", elem_id="results_dirs")
            load = gr.Button("Load", elem_id="load_results")
            plot = gr.Plot(label="per-task accuracy")
            table = gr.Dataframe(label="accuracy (overall = mean of the task means)", interactive=False)
            runs_state = gr.State([])
            run_pick = gr.Dropdown(choices=[], label="browse failures of run")
            fail_note = gr.Markdown()
            gallery = gr.Gallery(label="failures: [task] prompt -- reason", columns=6, height=420)
            load.click(user_errors(s.benchmark), [folders], [plot, table, run_pick, runs_state],
                       api_name="benchmark", concurrency_limit=4).then(
                user_errors(s.failures), [run_pick, runs_state], [gallery, fail_note], api_visibility="private")
            if config.results_dirs:  # --results: show them as soon as the page opens
                demo.load(user_errors(s.benchmark), [folders], [plot, table, run_pick, runs_state],
                          api_visibility="private").then(
                    user_errors(s.failures), [run_pick, runs_state], [gallery, fail_note], api_visibility="private")
            run_pick.input(user_errors(s.failures), [run_pick, runs_state], [gallery, fail_note], api_visibility="private")

    demo.queue(default_concurrency_limit=config.concurrency_limit, max_size=config.max_queue_size)
    demo.diffalign_state = s  # for tests and scripts
    return demo


def theme():
    # System fonts only: the default theme fetches Google Fonts, which an offline page cannot reach.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch(demo: gr.Blocks, config: DemoConfig, **kwargs):
    """Serve on config.host:port (127.0.0.1 unless told otherwise), with the upload cap."""
    return demo.launch(
        server_name=config.host,
        server_port=config.port,
        max_file_size=config.max_upload_bytes,
        show_error=True,
        ssr_mode=False,
        theme=theme(),
        css=CSS,
        footer_links=["api"],
        auth=config.auth,
        **kwargs,
    )
