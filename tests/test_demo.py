"""The Gradio demo: a real server on a free localhost port, driven through gradio_client and headless Chromium.

One server (tiny random SDXL + a random LoRA as the "aligned" model, 2 steps, 64 px) serves every test here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from PIL import Image  # noqa: E402

from diffalign.demo import DemoConfig  # noqa: E402
from diffalign.demo import benchmark as bench  # noqa: E402
from diffalign.demo import models as demo_models  # noqa: E402
from diffalign.demo.paths import PathPolicy  # noqa: E402
from diffalign.demo.scoring import Scorer, parse_reward_spec  # noqa: E402
from diffalign.demo.validation import DemoInputError, check_size, check_steps, open_image_upload  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photo of a red circle"  # a toy-world prompt: the GenEval verdict applies
STEPS, SIZE = 2, 64
# The default CLIP reward: the toy world's trained toy_clip when its weights ship, else a random tiny CLIP.
_TOY_CLIP_WEIGHTS = os.path.join(os.path.dirname(demo_models.__file__), "..", "toyworld", "checkpoints", "toy-clip")
CLIP_REWARD = "toy_clip" if os.path.isdir(_TOY_CLIP_WEIGHTS) else "clip_score (random)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_random_lora(folder: str) -> str:
    """A LoRA with random (non-zero) B matrices for the tiny SDXL UNet, saved as diffusers writes it."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffalign.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return folder


def write_results(folder: str, rows: list[tuple[str, bool]]) -> None:
    """A GenEval results folder: results.jsonl in the official row format, with one image per row."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    with open(os.path.join(folder, "results.jsonl"), "w") as f:
        for i, (tag, ok) in enumerate(rows):
            name = f"images/{i:04d}.png"
            Image.new("RGB", (32, 32), (200, 20 * i % 255, 0)).save(os.path.join(folder, name))
            f.write(json.dumps({"filename": name, "tag": tag, "prompt": f"prompt {i}", "correct": ok,
                                "reason": "" if ok else f"reason {i}",
                                "metadata": json.dumps({"tag": tag, "prompt": f"prompt {i}"})}) + "\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from diffalign.demo.app import build_app, launch

    root = tmp_path_factory.mktemp("demo")
    lora = save_random_lora(str(root / "lora"))
    run_a, run_b = str(root / "run_a"), str(root / "run_b")
    write_results(run_a, [("colors", True), ("colors", False), ("counting", False), ("counting", False)])
    write_results(run_b, [("colors", True), ("colors", True), ("counting", True), ("counting", False)])
    config = DemoConfig(
        base="tiny:sdxl", lora=lora, port=free_port(), max_steps=4, max_size=128, default_steps=STEPS,
        default_size=SIZE, concurrency_limit=2, max_upload_mb=0.05, max_upload_pixels=128 * 128,
        results_dirs=[run_a, run_b],
    )
    demo = build_app(config)
    launch(demo, config, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{config.port}/"
    client = Client(url, verbose=False)
    yield {"url": url, "client": client, "demo": demo, "config": config, "root": root, "lora": lora,
           "runs": (run_a, run_b)}
    demo.close()


def compare(client, prompt=PROMPT, seed=0, steps=STEPS, size=SIZE, guidance=5.0, lora=None, server=None):
    lora = server["lora"] if lora is None else lora
    return client.predict(prompt, seed, steps, size, guidance, lora, api_name="/compare")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------------------------------------- API


def test_server_binds_localhost_and_names_its_endpoints(server):
    assert server["config"].host == "127.0.0.1"
    assert server["url"].startswith("http://127.0.0.1:")
    named = server["client"].view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/compare", "/personalize", "/pairs", "/benchmark"} <= set(named)


def test_compare_returns_base_and_aligned_images_with_scores(server):
    base, base_md, aligned, aligned_md, details = compare(server["client"], server=server)
    a, b = pixels(base), pixels(aligned)
    assert a.shape == b.shape == (SIZE, SIZE, 3)
    assert not np.array_equal(a, b), "the LoRA must change the image"
    assert details["seed"] == 0 and details["steps"] == STEPS and details["lora"].endswith(".safetensors")
    for side, md in (("base", base_md), ("aligned", aligned_md)):
        rewards = details[side]["rewards"]
        assert list(rewards) == ["toy_geneval", CLIP_REWARD]  # the offline defaults
        assert all(np.isfinite(v) for v in rewards.values())
        # The exact checker's graded reward is 1.0 exactly when the GenEval verdict is "correct".
        assert 0.0 <= rewards["toy_geneval"] <= 1.0
        assert (rewards["toy_geneval"] == 1.0) == details[side]["geneval"]["correct"]
        verdict = details[side]["geneval"]
        assert verdict["available"] and verdict["task"] == "colors"
        assert verdict["correct"] is (rewards["toy_geneval"] == 1.0)
        assert verdict["correct"] or verdict["reason"]  # a failure always says why
        assert CLIP_REWARD in md and "GenEval (colors)" in md
    # Same seed -> the same base image (the comparison is paired).
    again = compare(server["client"], server=server)
    assert np.array_equal(pixels(again[0]), a)
    assert np.array_equal(pixels(again[2]), b)


def test_compare_without_lora_and_non_toy_prompt_says_why(server):
    base, _, aligned, aligned_md, details = compare(server["client"], prompt="an astronaut riding a horse", lora="",
                                                    server=server)
    assert aligned is None and "no LoRA" in aligned_md
    assert details["base"]["geneval"]["available"] is False
    assert "not a toy-world prompt" in details["base"]["geneval"]["reason"]
    # The exact-checker reward cannot judge it either, and says why; the CLIP reward still scores it.
    assert details["base"]["rewards"]["toy_geneval"] is None
    assert "'an astronaut riding a horse' is not a toy-world" in details["base"]["reward_errors"]["toy_geneval"]
    assert np.isfinite(details["base"]["rewards"][CLIP_REWARD])
    assert pixels(base).shape == (SIZE, SIZE, 3)


def test_personalize_from_pair_choices_and_uploads(server, tmp_path):
    client = server["client"]
    pairs = client.predict(PROMPT, 100, STEPS, SIZE, 5.0, api_name="/pairs")
    assert len(pairs) == 8 and all(pixels(p).shape == (SIZE, SIZE, 3) for p in pairs)
    chosen = tmp_path / "chosen.png"
    rejected = tmp_path / "rejected.png"
    Image.new("RGB", (64, 64), (220, 30, 30)).save(chosen)
    Image.new("RGB", (64, 64), (30, 70, 220)).save(rejected)
    base, base_md, mine, mine_md, details = client.predict(
        PROMPT, 100, "left", "right", None, "left", [handle_file(str(chosen))], [handle_file(str(rejected))],
        0, STEPS, SIZE, 5.0, 1.0, api_name="/personalize",
    )
    assert details["examples_from_pairs"] == 3 and details["examples_uploaded"] == 1
    assert details["embedding_shape"] == [4, 32]
    a, b = pixels(base), pixels(mine)
    assert a.shape == b.shape == (SIZE, SIZE, 3)
    assert not np.array_equal(a, b), "the (random) user branch must change the image"
    # The base column is the same model and seed as Compare's base column.
    assert np.array_equal(a, pixels(compare(client, server=server)[0]))
    for side in ("base", "personalized"):
        assert np.isfinite(details[side]["rewards"][CLIP_REWARD])
        assert details[side]["geneval"]["available"]
    # Other choices -> another user embedding -> another image.
    other = client.predict(PROMPT, 100, "right", "left", "left", "right", [], [], 0, STEPS, SIZE, 5.0, 1.0,
                           api_name="/personalize")
    assert not np.array_equal(pixels(other[2]), b)


# ---------------------------------------------------------------------------------------------- misuse


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="   "), "prompt is empty"),
        (dict(steps=5), "maximum"),  # the slider's own bound (config.max_steps=4)
        (dict(size=256), "maximum"),
        (dict(size=68), "multiple of 8"),
        (dict(lora="missing.safetensors"), "LoRA checkpoint .*missing.safetensors' not found"),
        (dict(lora="CORRUPT"), "not a readable safetensors file"),
    ],
)
def test_bad_compare_input_is_a_visible_error(server, kwargs, message):
    if kwargs.get("lora") == "CORRUPT":
        corrupt = server["root"] / "lora" / "corrupt.safetensors"  # inside --lora's folder: allowed
        corrupt.write_bytes(b"\x00garbage")
        kwargs = {"lora": str(corrupt)}
    with pytest.raises(AppError, match=message):
        compare(server["client"], server=server, **kwargs)


def test_bad_uploads_are_visible_errors(server, tmp_path):
    client = server["client"]
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (220, 30, 30)).save(good)
    unreadable = tmp_path / "broken.png"
    unreadable.write_bytes(b"this is not a PNG")
    too_many_pixels = tmp_path / "huge.png"
    Image.new("RGB", (200, 200)).save(too_many_pixels)  # 40,000 px > 128*128
    cases = [
        ([unreadable], [good], "'broken.png' is not a readable image"),
        ([too_many_pixels], [good], "the limit is 16384 pixels"),
        ([good], [good, good], "1 preferred but 2 rejected"),
    ]
    for pref, rej, message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(PROMPT, 100, None, None, None, None, [handle_file(str(p)) for p in pref],
                           [handle_file(str(p)) for p in rej], 0, STEPS, SIZE, 5.0, 1.0, api_name="/personalize")
    with pytest.raises(AppError, match="no examples"):
        client.predict(PROMPT, 100, None, None, None, None, [], [], 0, STEPS, SIZE, 5.0, 1.0, api_name="/personalize")
    # Over the byte cap (0.05 MB): the server refuses the upload itself.
    noisy = tmp_path / "noisy.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(noisy)
    assert os.path.getsize(noisy) > server["config"].max_upload_bytes
    with pytest.raises(Exception, match="(?i)too large|size|413"):
        client.predict(PROMPT, 100, None, None, None, None, [handle_file(str(noisy))], [handle_file(str(good))],
                       0, STEPS, SIZE, 5.0, 1.0, api_name="/personalize")
    # Still serving.
    assert pixels(compare(client, server=server)[0]).shape == (SIZE, SIZE, 3)


def test_load_20_concurrent_compare_requests_all_complete(toy_server):
    """On the toy model (the shipped checkpoint; the tiny one if it is absent), base + aligned per request."""
    server = toy_server
    client = server["client"]
    jobs = [client.submit(PROMPT, seed, STEPS, SIZE, 5.0, server["lora"], api_name="/compare") for seed in range(20)]
    results = [job.result(timeout=300) for job in jobs]
    assert len(results) == 20
    for seed, (base, _, aligned, _, details) in enumerate(results):
        assert details["seed"] == seed
        assert pixels(base).shape == pixels(aligned).shape == (SIZE, SIZE, 3)
    # Different seeds give different images; the server still answers afterwards.
    assert not np.array_equal(pixels(results[0][0]), pixels(results[1][0]))
    with pytest.raises(AppError, match="prompt is empty"):
        compare(client, prompt="", server=server)
    assert compare(client, server=server)[4]["seed"] == 0


def test_benchmark_tab_reads_results_folders(server):
    client = server["client"]
    run_a, run_b = server["runs"]
    _plot, table, _dropdown = client.predict(f"{run_a}\n{run_b}", api_name="/benchmark")
    assert table["headers"] == ["run", "counting", "colors", "overall", "images"]  # GenEval's task order
    assert table["data"] == [["run_a", 0.0, 0.5, 0.25, 4], ["run_b", 0.5, 1.0, 0.75, 4]]
    with pytest.raises(AppError, match="no results.jsonl"):
        client.predict(os.path.join(run_a, "missing"), api_name="/benchmark")
    # The failure browser (a UI follow-up of /benchmark): image, prompt and reason of each failure.
    state = server["demo"].diffalign_state
    gallery, note = state.failures("run_a", bench.load_runs(run_a, state.results_paths))
    assert [caption for _, caption in gallery] == [
        "[colors] prompt 1 -- reason 1", "[counting] prompt 2 -- reason 2", "[counting] prompt 3 -- reason 3"]
    assert all(im.size == (32, 32) for im, _ in gallery) and note.startswith("3 failures of 4 images")


def upload(url: str, path: str) -> str:
    """POST a file to gradio's upload route, as any client can; returns its server path."""
    import httpx

    with open(path, "rb") as f:
        reply = httpx.post(url + "gradio_api/upload", files={"files": (os.path.basename(path), f)})
    reply.raise_for_status()
    return reply.json()[0]


def test_results_naming_server_files_are_refused(server, tmp_path):
    """The attack: upload a results file whose failure rows name server images outside the served folders,
    load it through /benchmark, open its failures. The page must not open those images."""
    client, state = server["client"], server["demo"].diffalign_state
    secret = tmp_path / "secret"
    secret.mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(secret / "private.png")
    (secret / "private.txt").write_text("not for clients")
    results = tmp_path / "results.jsonl"
    rows = [{"filename": str(secret / "private.png"), "tag": "colors", "prompt": "p", "correct": False, "reason": "r"},
            {"filename": "../" * 12 + str(secret / "private.png").lstrip("/"), "tag": "colors", "prompt": "q",
             "correct": False, "reason": "r"},
            {"filename": os.path.join(server["runs"][0], "images", "0001.png"), "tag": "colors", "prompt": "ok",
             "correct": False, "reason": "served"}]
    results.write_text("".join(json.dumps({**r, "metadata": json.dumps({"tag": r["tag"], "prompt": r["prompt"]})}) + "\n"
                               for r in rows))
    uploaded = upload(server["url"], str(results))
    _plot, table, _dropdown = client.predict(uploaded, api_name="/benchmark")  # uploads are allowed: it loads
    assert table["data"][0][-1] == 3
    runs = state.benchmark(uploaded)[-1]
    gallery, note = state.failures(runs[0].name, runs)
    assert [caption for _, caption in gallery] == ["[colors] ok -- served"]  # only the image under --results
    assert "2 rows name images outside the folders this demo serves" in note
    # Client paths outside the served folders are refused with one message, whether or not they exist.
    messages = []
    for path in ("/etc/passwd", "/no/such/results", str(secret), str(secret / "private.txt"),
                 os.path.join(server["runs"][0], "..", "run_b"), "../../etc"):
        with pytest.raises(AppError) as err:
            client.predict(path, api_name="/benchmark")
        messages.append(str(err.value).replace(repr(path), "PATH"))
    assert "not valid JSON" not in " ".join(messages) and "no results.jsonl" not in " ".join(messages)
    assert len(set(messages[:4])) == 1 and "not under a folder this demo serves" in messages[0]
    assert all("may not contain '..'" in m for m in messages[4:])
    # A LoRA path outside --lora's folder is refused the same way, existing or not.
    for path in (str(secret / "private.png"), str(tmp_path / "missing.safetensors")):
        with pytest.raises(AppError, match="not under a folder this demo serves"):
            compare(client, lora=path, server=server)


def test_lora_cache_is_bounded(tmp_path):
    models = demo_models.DemoModels("tiny:sdxl", max_loras=2)
    files = [models.load_lora(save_random_lora(str(tmp_path / f"lora{i}"))) for i in range(3)]
    assert models.loaded_loras == files[1:]  # the least recently used one was unloaded
    assert len(models.pipe.get_list_adapters()["unet"]) == 2
    models.load_lora(files[1])  # a hit moves it to the back
    models.generate(PROMPT, 0, 1, SIZE, 5.0, lora=files[0])  # an evicted LoRA is reloaded on use
    assert models.loaded_loras == [files[1], files[0]]


def test_public_bind_needs_a_login():
    with pytest.raises(ValueError, match="--auth USER:PASSWORD"):
        DemoConfig(host="0.0.0.0")
    assert DemoConfig(host="0.0.0.0", auth=[("u", "p")]).auth == [("u", "p")]
    assert DemoConfig(host="0.0.0.0", insecure_public=True).insecure_public


def test_cli_parses_logins(tmp_path):
    from diffalign.demo.cli import parse_auth

    logins = tmp_path / "logins"
    logins.write_text("# users\nana:s3:cret\n")
    assert parse_auth(["bo:pw"], str(logins)) == [("bo", "pw"), ("ana", "s3:cret")]
    with pytest.raises(ValueError, match="USER:PASSWORD"):
        parse_auth(["nopassword"], None)


def test_cli_refuses_a_public_bind_without_login(capsys):
    from diffalign.cli import main

    assert main(["demo", "--base", "tiny:sdxl", "--rewards", "none", "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    assert "--insecure_public" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def toy_server(server, tmp_path_factory):
    """The shipped toy-sdxl next to a LoRA from a 3-step DPO smoke run of the project trainer (synthetic
    colour pairs): the load test and the README screenshot. Without the toy checkpoint: the tiny server."""
    from diffalign.demo.app import build_app, launch

    toy = demo_models.toy_checkpoint_path("sdxl")
    if toy is None:
        yield server
        return
    out = str(tmp_path_factory.mktemp("toy_lora"))
    cmd = [sys.executable, "-m", "diffalign.cli", "train", "--config", os.path.join(REPO, "train", "configs", "tiny_sdxl_dpo.yaml"),
           f"pretrained_model_name_or_path={toy}", "max_train_steps=3", "checkpointing_steps=0", "validation_steps=0",
           "report_to=none", "learning_rate=1e-2", f"output_dir={out}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"})
    if done.returncode != 0:
        pytest.fail(f"the LoRA smoke run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    config = DemoConfig(base="toy", lora=out, port=free_port(), max_steps=20, default_steps=12, default_size=SIZE)
    demo = build_app(config)
    launch(demo, config, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{config.port}/"
    yield {"url": url, "demo": demo, "lora": out, "client": Client(url, verbose=False)}
    demo.close()


def test_browser_clicks_generate_and_sees_two_images(toy_server, tmp_path):
    server = toy_server
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("Debian chromium is not installed (.ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    # The committed README screenshot is rewritten only on request, so test runs leave the checkout clean.
    out = (os.path.join(REPO, "docs", "img", "demo.png") if os.environ.get("DIFFALIGN_UPDATE_SCREENSHOTS")
           else str(tmp_path / "demo.png"))
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=flags)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server["url"], wait_until="domcontentloaded")
            page.locator("#prompt textarea").fill(PROMPT)
            page.get_by_role("button", name="Generate", exact=True).click()
            page.wait_for_selector("#base_image img", timeout=60_000)
            page.wait_for_selector("#aligned_image img", timeout=60_000)
            page.wait_for_selector("#aligned_card >> text=GenEval", timeout=60_000)
            assert page.locator("#base_image img").count() == 1 and page.locator("#aligned_image img").count() == 1
            notices = page.locator("#notices").inner_text()
            assert "--lora" not in notices  # the aligned model is there
            if server["demo"].diffalign_state.models.source.kind == "tiny":
                assert "RANDOMLY initialised" in notices  # the page is honest about the model
            page.screenshot(path=out, full_page=True)
        finally:
            browser.close()
    with Image.open(out) as shot:
        assert shot.size[0] == 1280 and shot.size[1] >= 600


def test_browser_personalize_save_two_users_and_interpolate(server):
    """The UI-only path (session state): build a user, save A and B, interpolate; and an error toast."""
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("Debian chromium is not installed (.ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
    n_images = "document.querySelectorAll('.pixelated img').length"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=flags)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server["url"], wait_until="domcontentloaded")
            page.get_by_role("tab", name="Personalize").click()
            page.locator("#p_prompt textarea").fill(PROMPT)
            page.locator("#show_pairs").click()
            page.wait_for_function(f"{n_images} >= 8", timeout=60_000)
            # User A answers 3 pairs, user B all 4 (other answers): the card's example count tells the runs apart.
            for n, sides, button in ((3, ("left", "right"), "Save as user A"), (4, ("right", "left"), "Save as user B")):
                for i in range(1, n + 1):
                    page.locator(f"#choice_{i}").get_by_label(sides[i % 2]).check()
                page.locator("#personalize").click()
                page.wait_for_selector(f"text=for you · {n} examples", timeout=60_000)
                page.get_by_role("button", name=button).click()
            page.wait_for_selector("text=Saved: user A set, user B set.", timeout=30_000)
            page.get_by_role("button", name="Generate between A and B").click()
            page.wait_for_selector("text=between A and B · alpha 0.50", timeout=60_000)
            # Bad input in the browser: a visible error toast, and the page keeps working.
            page.get_by_role("tab", name="Compare").click()
            page.locator("#prompt textarea").fill("")
            page.get_by_role("button", name="Generate", exact=True).click()
            page.wait_for_selector("text=The prompt is empty", timeout=30_000)
        finally:
            browser.close()


# ---------------------------------------------------------------------------------------------- units


def test_toy_base_falls_back_to_random_tiny_with_a_notice(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_models, "TOY_CHECKPOINT_DIR", str(tmp_path))
    src = demo_models.resolve_base("toy")
    assert (src.kind, src.spec, src.family) == ("tiny", "tiny:sdxl", "sdxl")
    assert "Falling back to `tiny:sdxl`" in src.notices[0] and "RANDOMLY initialised" in src.notices[0]
    (tmp_path / "toy-sd3").mkdir()
    (tmp_path / "toy-sd3" / "model_index.json").write_text("{}")
    src = demo_models.resolve_base("toy:sd3")
    assert (src.kind, src.location, src.notices) == ("toy", str(tmp_path / "toy-sd3"), [])


def test_bad_model_paths_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a Hub id"):
        demo_models.resolve_base(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        demo_models.resolve_base(str(tmp_path))
    with pytest.raises(ValueError, match="unknown model family"):
        demo_models.resolve_base("tiny:flux")
    assert demo_models.resolve_base("stabilityai/stable-diffusion-xl-base-1.0").kind == "pretrained"
    with pytest.raises(FileNotFoundError, match="not found"):
        demo_models.resolve_lora_file(str(tmp_path / "nope"))
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="holds 2 .safetensors files"):
        demo_models.resolve_lora_file(str(tmp_path))
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="only safetensors"):
        demo_models.resolve_lora_file(str(tmp_path / "w.bin"))


def test_limits_and_uploads(tmp_path):
    assert check_steps("3", 4) == 3 and check_size(64.0, 32, 128) == 64
    for bad in (0, 5, 2.5, "x", float("nan")):
        with pytest.raises(DemoInputError):
            check_steps(bad, 4)
    path = tmp_path / "x.png"
    Image.new("RGB", (10, 10)).save(path)
    assert open_image_upload(str(path), 10_000, 100).size == (10, 10)
    with pytest.raises(DemoInputError, match="the limit is 99 pixels"):
        open_image_upload(str(path), 10_000, 99)
    with pytest.raises(DemoInputError, match="MB"):
        open_image_upload(str(path), 10, 100)


def test_reward_specs_and_toy_prompt_parsing():
    assert parse_reward_spec("clip_score:model_name='ViT-L-14',pretrained=openai,random_init=True") == (
        "clip_score", {"model_name": "ViT-L-14", "pretrained": "openai", "random_init": True})
    with pytest.raises(ValueError, match="not key=value"):
        parse_reward_spec("clip_score:oops")
    scorer = Scorer([], device="cpu", model_kind="tiny")
    assert scorer.rewards == [] and "No reward models" in scorer.notices[0]
    assert Scorer(["toy_geneval"], device="cpu").reward_names == ["toy_geneval"]  # toy rewards resolve when named
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        Scorer(["nope"], device="cpu")
    row = scorer.toy_metadata("A photo of a red circle and a blue square.")
    assert row["tag"] == "color_attr"
    assert scorer.toy_metadata("a photo of a dog") is None
    assert "toy-world scenes only" in Scorer([], device="cpu", model_kind="pretrained").verdict(None, "x")["reason"]


def test_toy_verdict_on_rendered_scenes_is_exact():
    """The verdict the app shows is GenEval's rule on the toy detector: right on a true scene, wrong otherwise."""
    from diffalign.toyworld import scenes

    scorer = Scorer([], device="cpu", model_kind="toy")
    row = scorer.toy_metadata(PROMPT)
    image = scenes.render(scenes.sample_scene(row, np.random.default_rng(0)))
    assert scorer.verdict(image, PROMPT)["correct"] is True
    wrong = scorer.verdict(image, "a photo of a blue square")
    assert wrong["correct"] is False and wrong["reason"]


def test_benchmark_accuracy_is_mean_of_task_means(tmp_path):
    write_results(str(tmp_path), [("colors", True), ("colors", True), ("colors", False), ("position", False)])
    policy = PathPolicy("results folder", [str(tmp_path)])
    run = bench.load_run(str(tmp_path), policy)
    acc = run.accuracy()
    assert acc["colors"] == pytest.approx(2 / 3) and acc["position"] == 0.0
    assert acc["overall"] == pytest.approx((2 / 3 + 0.0) / 2)
    path, refused = bench.failure_path(run, run.failures()[0], policy)
    assert path == os.path.realpath(tmp_path / "images" / "0002.png") and not refused
    (tmp_path / "results.jsonl").write_text('{"tag": "colors"}\n')
    with pytest.raises(DemoInputError, match="lacks"):
        bench.load_run(str(tmp_path), policy)
    with pytest.raises(DemoInputError, match="no results.jsonl"):
        bench.load_run(str(tmp_path / "missing"), policy)
    shutil.rmtree(tmp_path)


def test_saved_pipeline_folder_and_toy_checkpoint_load(tmp_path, monkeypatch):
    """`--base toy` loads a diffusers folder from toyworld/checkpoints; `--base PATH` loads any folder."""
    import torch

    from diffalign.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(0)
    pipe.save_pretrained(str(tmp_path / "toy-sdxl"))
    monkeypatch.setattr(demo_models, "TOY_CHECKPOINT_DIR", str(tmp_path))
    models = demo_models.DemoModels("toy", device="cpu")
    assert (models.source.kind, models.family, models.native_size) == ("toy", "sdxl", SIZE)
    image = models.generate(PROMPT, 3, STEPS, SIZE, 5.0)
    expected = pipe(prompt=PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=5.0,
                    generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    assert demo_models.DemoModels(str(tmp_path / "toy-sdxl"), device="cpu").source.kind == "pretrained"
    verdict = Scorer([], device="cpu", model_kind="toy").verdict(image, PROMPT)
    assert verdict["available"] and verdict["task"] == "colors"


def test_user_adapter_checkpoint_zero_init_and_interpolation(tmp_path):
    import torch

    from diffalign import personalization as P
    from diffalign.demo.personalize import Personalizer

    models = demo_models.DemoModels("tiny:sdxl", device="cpu")
    unet = models.pipe.unet
    # A "trained" adapter: random user-attention weights and encoder head, saved as PPD writes them.
    encoder = P.tiny_clip_user_encoder(dim=32, num_tokens=4, seed=1)
    P.add_user_attention(unet, encoder_dim=32, seed=1)
    with torch.no_grad():
        for param in P.user_attention_parameters(unet):
            param.normal_(0, 0.2)
    saved = {k: v.clone() for k, v in P.user_attention_state_dict(unet).items()}
    (tmp_path / "ppd").mkdir()
    P.save_user_attention(unet, str(tmp_path / "ppd" / "user_attention.safetensors"))
    P.remove_user_attention(unet)
    with pytest.raises(ValueError, match="no user-encoder head"):
        Personalizer(models, str(tmp_path / "ppd"))
    assert not P.has_user_attention(unet)  # nothing half-installed
    encoder.save_head(str(tmp_path / "ppd" / "user_encoder_head.safetensors"))
    with pytest.raises(FileNotFoundError, match="not found"):
        Personalizer(models, str(tmp_path / "missing"))

    p = Personalizer(models, str(tmp_path / "ppd"))
    assert p.trained
    loaded = P.user_attention_state_dict(unet)
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    assert all(torch.equal(a, b) for a, b in zip(p.encoder.head.state_dict().values(), encoder.head.state_dict().values()))
    pairs = p.pairs(PROMPT, 100, STEPS, SIZE, 5.0)
    emb_a = p.embed(p.examples(PROMPT, pairs, ["left", "left", "left", "left"], []))
    emb_b = p.embed(p.examples(PROMPT, pairs, ["right", "right", "right", "right"], []))
    assert not torch.allclose(emb_a, emb_b)
    image = lambda emb: np.asarray(p.generate(PROMPT, emb, 0, STEPS, SIZE, 5.0))  # noqa: E731
    img_a, img_b = image(emb_a), image(emb_b)
    assert np.array_equal(image(p.interpolate(emb_a, emb_b, 0.0)), img_a)
    assert np.array_equal(image(p.interpolate(emb_a, emb_b, 1.0)), img_b)
    mid = image(p.interpolate(emb_a, emb_b, 0.5))
    assert not np.array_equal(mid, img_a) and not np.array_equal(mid, img_b)
    # Without a user the shared UNet is the base model again.
    base = np.asarray(models.generate(PROMPT, 0, STEPS, SIZE, 5.0))
    P.remove_user_attention(unet)
    assert np.array_equal(base, np.asarray(models.generate(PROMPT, 0, STEPS, SIZE, 5.0)))

    # --user_encoder names the backbone the adapter was trained with (no "random backbone" notice then).
    named = Personalizer(models, str(tmp_path / "ppd"), "clip:model_name='diffalign-tiny-clip'")
    assert named.trained and named.encoder.dim == 32 and named.encoder.num_tokens == 4
    assert not any("tiny RANDOM open_clip" in n for n in named.notices)
    P.remove_user_attention(unet)

    # A trained base without --user_adapter gets a fresh, zero-initialised branch: "for you" == base, as the notice says.
    models.source.kind = "toy"
    fresh = Personalizer(models, None)
    assert not fresh.trained and "equals the base exactly" in fresh.notices[-1]
    emb = fresh.embed(fresh.examples(PROMPT, pairs, ["left", None, None, None], []))
    assert np.array_equal(np.asarray(fresh.generate(PROMPT, emb, 0, STEPS, SIZE, 5.0)), base)


def test_cli_refuses_missing_checkpoints_before_serving(tmp_path, capsys):
    from diffalign.cli import main

    assert main(["demo", "--base", str(tmp_path / "no-model"), "--port", str(free_port())]) == 2
    assert "neither an existing folder nor a Hub id" in capsys.readouterr().err
    assert main(["demo", "--base", "tiny:sdxl", "--lora", str(tmp_path / "no-lora"), "--rewards", "none",
                 "--port", str(free_port())]) == 2
    assert "LoRA checkpoint" in capsys.readouterr().err
