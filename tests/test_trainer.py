"""The preference trainer on tiny offline models: config handling, LoRA and full runs for SDXL+DPO
and SD3+RankDPO, loadable outputs, atomic checkpoints, deterministic resume, non-finite stops."""

import glob
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from diffalign.data.synthetic import SyntheticPreferenceDataset
from diffalign.training import ConditioningHook, NonFiniteLossError, PreferenceTrainer, TrainConfig
from diffalign.training import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": REPO}


def tiny(tmp_path, name="run", **overrides) -> TrainConfig:
    values = dict(
        pretrained_model_name_or_path="tiny:sdxl", objective="dpo", beta=100.0, dataset="synthetic:pairs:16",
        resolution=64, tuning="lora", lora_rank=4, train_batch_size=2, learning_rate=1e-3, max_train_steps=3,
        checkpointing_steps=0, report_to="none", progress_bar=False, output_dir=str(tmp_path / name),
    )
    values.update(overrides)
    return TrainConfig(**values)


def read_losses(output_dir) -> dict[int, float]:
    out = {}
    with open(os.path.join(output_dir, "losses.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            out[row["step"]] = row["loss"]  # a replayed step (after a resume) overwrites the killed run's entry
    return out


# --- config ------------------------------------------------------------------------------------
def test_config_yaml_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("objective: rankdpo\nlearning_rate: 1.0e-6\nmax_train_steps: 7\nvalidation_prompts: [a, b]\n")
    cfg = TrainConfig.from_yaml(str(path), ["learning_rate=3e-5", "tuning=full"])
    assert cfg.objective == "rankdpo" and cfg.learning_rate == 3e-5 and cfg.tuning == "full" and cfg.max_train_steps == 7
    assert cfg.validation_prompts == ["a", "b"] and isinstance(cfg.learning_rate, float)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['learning_rat'\]. Valid keys: .*learning_rate"):
        TrainConfig.from_yaml(str(path), ["learning_rat=1"])
    with pytest.raises(ValueError, match="max_train_steps expects an integer"):
        TrainConfig.from_yaml(None, ["max_train_steps=abc"])
    with pytest.raises(ValueError, match="objective='dpa' is not one of"):
        TrainConfig.from_yaml(None, ["objective=dpa"])
    with pytest.raises(ValueError, match="key=value"):
        TrainConfig.from_yaml(None, ["learning_rate"])
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped config; shipped: .*tiny_sdxl_dpo"):
        TrainConfig.from_yaml(str(tmp_path / "missing.yaml"))


def test_shipped_config_by_name(tmp_path, monkeypatch):
    import diffalign.training
    from diffalign.training.config import CONFIG_DIR, available_configs

    # Shipped inside the package (so a wheel carries them); train/configs in a checkout points there.
    assert os.path.dirname(CONFIG_DIR) == os.path.dirname(diffalign.training.__file__)
    assert os.path.samefile(os.path.join(REPO, "train", "configs"), CONFIG_DIR)
    assert {"sdxl_dpo", "sdxl_rankdpo", "sd3_rankdpo", "tiny_sdxl_dpo"} <= set(available_configs())
    by_path = TrainConfig.from_yaml(os.path.join(REPO, "train", "configs", "tiny_sdxl_dpo.yaml"))
    monkeypatch.chdir(tmp_path)  # outside a checkout: names and the documented relative path still resolve
    for spelling in ("tiny_sdxl_dpo", "tiny_sdxl_dpo.yaml", "train/configs/tiny_sdxl_dpo.yaml"):
        assert TrainConfig.from_yaml(spelling) == by_path
    with pytest.raises(FileNotFoundError, match="shipped: "):
        TrainConfig.from_yaml("other/dir/tiny_sdxl_dpo.yaml")


def test_shipped_configs_load():
    paths = sorted(glob.glob(os.path.join(REPO, "train", "configs", "*.yaml")))
    names = {os.path.basename(p) for p in paths}
    assert {"sdxl_dpo.yaml", "sdxl_rankdpo.yaml", "sd3_rankdpo.yaml", "tiny_sdxl_dpo.yaml", "tiny_sd3_rankdpo.yaml",
            "sdxl_ppd.yaml", "tiny_sdxl_ppd.yaml"} <= names
    for path in paths:
        cfg = TrainConfig.from_yaml(path)
        assert cfg.beta > 0
    real = TrainConfig.from_yaml(os.path.join(REPO, "train", "configs", "sdxl_dpo.yaml"))
    assert real.beta == 5000.0 and real.learning_rate == 1e-8 and real.scale_lr
    assert real.train_batch_size * real.gradient_accumulation_steps * 8 == 2048
    ppd = TrainConfig.from_yaml(os.path.join(REPO, "train", "configs", "sdxl_ppd.yaml"))
    assert ppd.objective == "ppd" and ppd.tuning == "none" and ppd.ppd_num_context == 4 and ppd.ppd_encoder == "vlm"


def test_checkpoint_latest_ignores_partial_saves(tmp_path):
    out = str(tmp_path)
    done = ckpt.temporary_dir(out, 3)
    os.makedirs(done)
    ckpt.finalize(done, out, 3, {"global_step": 3})
    os.makedirs(ckpt.temporary_dir(out, 6))  # a save killed before its rename
    os.makedirs(os.path.join(out, "checkpoint-9"))  # no trainer_state.json: not a checkpoint
    assert ckpt.latest_checkpoint(out) == os.path.join(out, "checkpoint-3")
    assert ckpt.resolve_resume("latest", out) == os.path.join(out, "checkpoint-3")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume(os.path.join(out, "checkpoint-9"), out)
    ckpt.clean_temporary(out)
    assert not os.path.exists(ckpt.temporary_dir(out, 6))


# --- runs ----------------------------------------------------------------------------------------
class RecordingHook(ConditioningHook):
    def __init__(self):
        self.calls = []

    def policy_context(self, model, batch):
        self.calls.append("policy")
        return super().policy_context(model, batch)

    def reference_context(self, model, batch):
        self.calls.append("reference")
        return super().reference_context(model, batch)


def test_sdxl_dpo_lora_run_saves_loadable_lora(tmp_path):
    from diffalign.testing import tiny_sdxl_pipeline

    # lora_alpha != rank: the saved adapter metadata must carry the scale (alpha / rank = 4).
    cfg = tiny(tmp_path, report_to="tensorboard", validation_steps=3, validation_prompts=["a red square"],
               validation_num_inference_steps=1, lora_alpha=16, checkpointing_steps=2)
    hook = RecordingHook()
    trainer = PreferenceTrainer(cfg, conditioning=hook)
    summary = trainer.train()
    out = cfg.output_dir
    losses = read_losses(out)
    assert sorted(losses) == [1, 2, 3]
    # LoRA starts at B=0: policy == reference, so the first DPO loss is exactly log 2.
    assert losses[1] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(v) for v in losses.values()) and losses[3] != losses[1]
    assert hook.calls[:2] == ["reference", "policy"] and len(hook.calls) == 6
    with open(os.path.join(out, "training_summary.json")) as f:
        saved = json.load(f)
    assert saved["global_step"] == 3 and saved["final_loss"] == summary["final_loss"]
    assert "implicit_acc" in saved["final_metrics"] and "rewards/margin" in saved["final_metrics"]
    events = glob.glob(os.path.join(out, "logs", "**", "events.out.tfevents*"), recursive=True)
    assert events
    assert os.path.isfile(os.path.join(out, "validation", "step-000003.png"))
    # The validation images reach the tracker too (one image per prompt, at the validation step).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.dirname(events[0]), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("validation")
    assert [e.step for e in images] == [3] and (images[0].width, images[0].height) == (64, 64)

    # The saved LoRA loads into a fresh pipeline, changes its denoiser, and reproduces the trained one.
    pipe = tiny_sdxl_pipeline(cfg.model_seed)
    adapter = trainer.adapter
    text = adapter.encode_prompts(["a red square"])
    micro = adapter.micro_conditioning(torch.tensor([[64, 64]]), torch.tensor([[0, 0]]), (64, 64))
    x, t = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    with torch.no_grad():
        base = adapter.predict(pipe.unet, x, t, text, micro)
        pipe.load_lora_weights(out)
        loaded = adapter.predict(pipe.unet, x, t, text, micro)
        ours = adapter.predict(trainer.unwrapped, x, t, text, micro)
    assert not torch.allclose(base, loaded, atol=1e-5)
    torch.testing.assert_close(loaded, ours, atol=1e-5, rtol=1e-4)
    # An intermediate checkpoint loads the same way, as diffusers scripts' checkpoints do.
    mid = tiny_sdxl_pipeline(cfg.model_seed)
    mid.load_lora_weights(os.path.join(out, "checkpoint-2"))
    with torch.no_grad():
        at_step_2 = adapter.predict(mid.unet, x, t, text, micro)
    assert not torch.allclose(base, at_step_2, atol=1e-5) and not torch.allclose(loaded, at_step_2, atol=1e-5)


def test_sdxl_dpo_full_finetune(tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = tiny(tmp_path, tuning="full", learning_rate=1e-4, max_train_steps=2)
    trainer = PreferenceTrainer(cfg)
    assert trainer.reference is not None and not any(p.requires_grad for p in trainer.reference.parameters())
    before = {k: v.clone() for k, v in trainer.reference.state_dict().items()}
    trainer.train()
    saved = UNet2DConditionModel.from_pretrained(os.path.join(cfg.output_dir, "unet"))
    diff = max((saved.state_dict()[k] - before[k]).abs().max().item() for k in before)
    assert diff > 0  # the policy moved ...
    torch.testing.assert_close(trainer.reference.state_dict()["conv_in.weight"], before["conv_in.weight"])  # ... the reference did not
    losses = read_losses(cfg.output_dir)
    assert losses[1] == pytest.approx(math.log(2), abs=1e-5)
    # The output folder is a pipeline: plain diffusers loads the fine-tuned model from it.
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(cfg.output_dir)
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in pipe.unet.state_dict().items())
    assert pipe(prompt="a red square", num_inference_steps=1, height=64, width=64, output_type="np").images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_sd3_rankdpo_runs(tmp_path, tuning):
    from diffalign.testing import tiny_sd3_pipeline

    cfg = tiny(tmp_path, pretrained_model_name_or_path="tiny:sd3", objective="rankdpo", dataset="synthetic:ranked:12:3",
               resolution=32, tuning=tuning, max_train_steps=2, learning_rate=1e-3 if tuning == "lora" else 1e-4)
    summary = PreferenceTrainer(cfg).train()
    assert summary["family"] == "sd3" and summary["loss_name"] == "rankdpo"
    assert "rank_corr" in summary["final_metrics"] and math.isfinite(summary["final_loss"])
    if tuning == "lora":
        pipe = tiny_sd3_pipeline(cfg.model_seed)
        gen = lambda: pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np",  # noqa: E731
                           generator=torch.Generator().manual_seed(0)).images
        before = gen()
        pipe.load_lora_weights(cfg.output_dir)
        assert not torch.allclose(torch.from_numpy(before), torch.from_numpy(gen()), atol=1e-5)
    else:
        assert os.path.isfile(os.path.join(cfg.output_dir, "transformer", "config.json"))


def test_sft_weight_adds_the_best_samples_error_to_the_preference_loss(tmp_path):
    # Same seed, same draws: at step 1 (policy = reference) the anchored loss is the plain one plus w x the anchor.
    kw = dict(pretrained_model_name_or_path="tiny:sd3", objective="rankdpo", dataset="synthetic:ranked:6:3", resolution=32,
              max_train_steps=1)
    PreferenceTrainer(tiny(tmp_path, "plain", **kw)).train()
    PreferenceTrainer(tiny(tmp_path, "anchored", sft_weight=50.0, **kw)).train()
    rows = {}
    for name in ("plain", "anchored"):
        with open(tmp_path / name / "losses.jsonl", encoding="utf-8") as f:
            rows[name] = json.loads(f.readline())
    assert "sft_anchor" not in rows["plain"] and rows["anchored"]["sft_anchor"] > 0
    assert rows["anchored"]["loss"] == pytest.approx(rows["plain"]["loss"] + 50.0 * rows["anchored"]["sft_anchor"], rel=1e-5)
    with pytest.raises(ValueError, match="sft_weight must be >= 0"):
        tiny(tmp_path, sft_weight=-1.0)
    with pytest.raises(ValueError, match="objective='sft' is SFT already"):
        tiny(tmp_path, objective="sft", sft_weight=1.0)


def test_precomputed_reference_gives_the_same_losses(tmp_path):
    # Two epochs (6 groups, 2 per step), prompt dropout on: every draw is keyed by (epoch, group).
    kw = dict(pretrained_model_name_or_path="tiny:sd3", objective="rankdpo", dataset="synthetic:ranked:6:3", resolution=32,
              max_train_steps=5, prompt_dropout=0.5)
    PreferenceTrainer(tiny(tmp_path, "live", **kw)).train()
    PreferenceTrainer(tiny(tmp_path, "pre", precompute_reference=True, **kw)).train()
    # One group per pre-pass forward: the errors do not depend on which groups share a forward (beyond float
    # rounding: BLAS blocks a batch of 8 differently from one of 2, ~1e-5 relative).
    PreferenceTrainer(tiny(tmp_path, "pre1", precompute_reference=True, precompute_reference_batch_size=1, **kw)).train()
    live, pre, pre1 = read_losses(tmp_path / "live"), read_losses(tmp_path / "pre"), read_losses(tmp_path / "pre1")
    assert sorted(live) == sorted(pre) == sorted(pre1) == [1, 2, 3, 4, 5]
    for step in live:
        assert pre[step] == pytest.approx(live[step], rel=1e-4) and pre1[step] == pytest.approx(live[step], rel=1e-4)


def test_saved_reference_errors_are_reused_by_a_sweep(tmp_path):
    ref_dir = str(tmp_path / "ref_errors")
    kw = dict(pretrained_model_name_or_path="tiny:sd3", dataset="synthetic:pairs:6", resolution=32, max_train_steps=3,
              precompute_reference=True, reference_errors_path=ref_dir)
    first = PreferenceTrainer(tiny(tmp_path, "b100", beta=100.0, **kw))
    first.train()
    # 6 groups (3 steps of 2), one forward of up to 4 x 2 groups.
    assert (first.reference_groups, first.reference_passes) == (6, 1) and os.path.isfile(os.path.join(ref_dir, "fingerprint.json"))
    second = PreferenceTrainer(tiny(tmp_path, "b500", beta=500.0, **kw))  # a beta sweep: same reference errors
    second.train()
    assert (second.reference_groups, second.reference_passes) == (0, 0)
    live = PreferenceTrainer(tiny(tmp_path, "live", beta=500.0, **{k: v for k, v in kw.items() if k not in
                                                                  ("precompute_reference", "reference_errors_path")}))
    live.train()
    got, want = read_losses(tmp_path / "b500"), read_losses(tmp_path / "live")
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4)
    longer = PreferenceTrainer(tiny(tmp_path, "longer", beta=500.0, **{**kw, "max_train_steps": 5}))
    longer.train()
    assert longer.reference_groups == 4  # only the new steps' groups (the second epoch's first 4)
    with pytest.raises(ValueError, match=r"differs in \['prompt_dropout'\]"):
        PreferenceTrainer(tiny(tmp_path, "other", prompt_dropout=0.2, **kw)).train()


class NanAfter(SyntheticPreferenceDataset):
    """Groups turn NaN from the `bad_from`-th item read on (batch 1, no workers: step = item)."""

    def __init__(self, bad_from, **kw):
        super().__init__(**kw)
        self.bad_from, self.reads = bad_from, 0

    def __getitem__(self, index):
        item = super().__getitem__(index)
        self.reads += 1
        if self.reads >= self.bad_from:
            item["pixel_values"] = torch.full_like(item["pixel_values"], float("nan"))
        return item


def test_non_finite_loss_names_the_step_and_keeps_checkpoint(tmp_path):
    cfg = tiny(tmp_path, train_batch_size=1, max_train_steps=5, checkpointing_steps=2)
    trainer = PreferenceTrainer(cfg, train_dataset=NanAfter(3, num_groups=8, resolution=64))
    with pytest.raises(NonFiniteLossError, match=r"at step 3 .*checkpoint-2"):
        trainer.train()
    assert ckpt.latest_checkpoint(cfg.output_dir).endswith("checkpoint-2")
    with open(os.path.join(cfg.output_dir, "training_summary.json")) as f:
        assert json.load(f)["status"] == "non_finite_loss"


def test_ppd_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="tuning='none' .* needs objective='ppd'"):
        tiny(tmp_path, tuning="none")
    with pytest.raises(ValueError, match="ppd_min_pairs"):
        tiny(tmp_path, objective="ppd", ppd_num_context=4, ppd_min_pairs=4)
    with pytest.raises(ValueError, match="ppd_encoder_model"):
        PreferenceTrainer(tiny(tmp_path, objective="ppd"))
    with pytest.raises(ValueError, match="none of the 16 rows has a user_id"):
        PreferenceTrainer(tiny(tmp_path, objective="ppd", ppd_encoder_model="tiny", ppd_encoder_dim=16))


def test_missing_optional_backends_fail_clearly(tmp_path):
    pytest.importorskip("peft")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="bitsandbytes"):
            PreferenceTrainer(tiny(tmp_path, optimizer="adamw8bit"))
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"diffalign\[xformers\]"):
            PreferenceTrainer(tiny(tmp_path, attention_backend="xformers"))


# --- processes -----------------------------------------------------------------------------------
def _train_cmd(out, *extra):
    return [sys.executable, os.path.join(REPO, "train", "train.py"), "--config",
            os.path.join(REPO, "train", "configs", "tiny_sdxl_dpo.yaml"), f"output_dir={out}", "report_to=none",
            "validation_steps=0", "progress_bar=false", "dataset=synthetic:pairs:16", *extra]


def test_killed_and_resumed_run_reproduces_losses(tmp_path):
    common = ["max_train_steps=6", "checkpointing_steps=2", "lora_rank=4"]
    # Uninterrupted reference run, in-process.
    ref_out = tmp_path / "ref"
    cfg = TrainConfig.from_yaml(os.path.join(REPO, "train", "configs", "tiny_sdxl_dpo.yaml"),
                                [f"output_dir={ref_out}", "report_to=none", "validation_steps=0", "progress_bar=false",
                                 "dataset=synthetic:pairs:16", *common])
    PreferenceTrainer(cfg).train()
    expected = read_losses(ref_out)

    # The same run in a subprocess, SIGKILLed once it has passed checkpoint-2.
    out = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w+")  # a file, not a pipe: a full pipe buffer would block the child
    proc = subprocess.Popen(_train_cmd(out, *common), env=ENV, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(out / "losses.jsonl") and max(read_losses(out), default=0) >= 3:
            proc.kill()
            killed = True
            break
        time.sleep(0.02)
    proc.wait()
    log.seek(0)
    assert killed, f"the run ended before it could be killed: {log.read()[-2000:]}"
    log.close()
    assert ckpt.latest_checkpoint(str(out)) is not None
    partial = read_losses(out)
    assert max(partial) < 6

    resumed = TrainConfig.from_yaml(os.path.join(REPO, "train", "configs", "tiny_sdxl_dpo.yaml"),
                                    [f"output_dir={out}", "report_to=none", "validation_steps=0", "progress_bar=false",
                                     "dataset=synthetic:pairs:16", "resume_from_checkpoint=latest", *common])
    summary = PreferenceTrainer(resumed).train()
    assert summary["resumed_from_step"] >= 2
    got = read_losses(out)
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    with open(out / "losses.jsonl", encoding="utf-8") as f:  # the killed run's steps after its checkpoint are gone
        assert [json.loads(line)["step"] for line in f] == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}"


def test_output_dir_of_an_earlier_run_is_refused_and_resume_must_keep_the_config(tmp_path, caplog):
    PreferenceTrainer(tiny(tmp_path, max_train_steps=2, checkpointing_steps=1)).train()
    with pytest.raises(FileExistsError, match="holds an earlier run .*losses.jsonl.*resume_from_checkpoint=latest"):
        PreferenceTrainer(tiny(tmp_path, max_train_steps=2))
    with pytest.raises(ValueError, match=r"different config: beta: 100.0 -> 50.0; objective: 'dpo' -> 'sft'"):
        PreferenceTrainer(tiny(tmp_path, max_train_steps=3, resume_from_checkpoint="latest", beta=50.0, objective="sft"))
    # Longer, with other logging: allowed. A missing random-state file is reported, not ignored.
    os.remove(tmp_path / "run" / "checkpoint-2" / "random_states_0.pkl")
    with caplog.at_level("WARNING", logger="diffalign.training"):
        summary = PreferenceTrainer(tiny(tmp_path, max_train_steps=3, resume_from_checkpoint="latest", log_every=2)).train()
    assert summary["resumed_from_step"] == 2 and "random_states_0.pkl is missing or unreadable" in caplog.text
    # overwrite_output_dir starts over: one log line per step of the new run, no old checkpoints.
    PreferenceTrainer(tiny(tmp_path, max_train_steps=1, overwrite_output_dir=True)).train()
    with open(tmp_path / "run" / "losses.jsonl", encoding="utf-8") as f:
        assert [json.loads(line)["step"] for line in f] == [1]
    assert ckpt.latest_checkpoint(str(tmp_path / "run")) is None


def test_yaml_no_is_mixed_precision_no():
    assert TrainConfig.from_yaml(None, ["mixed_precision=no", "output_dir=x"]).mixed_precision == "no"


def test_mixed_precision_comes_from_the_launcher_unless_set(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` sets from its config
    trainer = PreferenceTrainer(tiny(tmp_path, "launcher"))
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.weight_dtype == torch.bfloat16
    assert trainer.config.mixed_precision == "bf16"
    # A second precision in the same process: accelerate refuses it, and the error says what to do.
    with pytest.raises(ValueError, match="mixed_precision='no': this process already made .* new process"):
        PreferenceTrainer(tiny(tmp_path, "explicit", mixed_precision="no"))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)  # what a new process starts with
    explicit = PreferenceTrainer(tiny(tmp_path, "explicit", mixed_precision="no", overwrite_output_dir=True))
    assert explicit.accelerator.mixed_precision == "no" and explicit.weight_dtype == torch.float32


def test_gradient_accumulation_sums_the_micro_batches_mean(tmp_path):
    """accelerator.accumulate(): the update's gradient is the mean of the micro-batches' gradients, and a
    wrong number of micro-batches is refused."""
    from diffalign.training.sampling import KeyedDataset, collate_keyed

    trainer = PreferenceTrainer(tiny(tmp_path, train_batch_size=1, gradient_accumulation_steps=2, max_grad_norm=0.0))
    data = KeyedDataset(trainer.dataset)
    batches = [collate_keyed([data[(0, i)]]) for i in (0, 3)]
    expected = None
    for j, batch in enumerate(batches):
        loss, _ = trainer.compute_loss(batch, micro_step=j)
        grads = torch.autograd.grad(loss, trainer.trainable)
        expected = grads if expected is None else [a + b for a, b in zip(expected, grads)]
    expected = [g / 2 for g in expected]
    seen = []
    real_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (seen.append([p.grad.clone() for p in trainer.trainable]), real_step(*a, **k))
    trainer.optimizer_step(batches, step=0, micro_step=0)
    assert len(seen) == 1
    for got, want in zip(seen[0], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="got 1 micro-batches; gradient_accumulation_steps is 2"):
        trainer.optimizer_step(batches[:1], step=1, micro_step=2)


@pytest.mark.parametrize("override, message", [
    (dict(validation_steps=1, validation_prompts=[]), "at least one non-empty validation prompt"),
    (dict(validation_guidance_scale=float("nan")), "validation_guidance_scale must be a finite"),
    (dict(resolution=7), "multiple of 8"),
    (dict(checkpoints_total_limit=0), "checkpoints_total_limit must be >= 1"),
    (dict(use_ema=True, ema_decay=2.0), "ema_decay must be in"),
    (dict(output_dir=""), "output_dir is empty"),
    (dict(learning_rate=float("inf")), "learning_rate must be finite"),
])
def test_bad_config_fails_before_any_work(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        tiny(tmp_path, **override)


def test_two_processes_on_cpu(tmp_path):
    """2 processes (DDP, gloo) through train/train.py with the PPD config and LoRA: LoRA, user attention
    (inside the prepared UNet) and the encoder head (outside it, all-reduced by hand) end exactly where
    one process with the same global batch ends. An unsynced head would follow rank 0's gradient only."""
    from safetensors.torch import load_file

    ppd = os.path.join(REPO, "train", "configs", "tiny_sdxl_ppd.yaml")
    common = ["report_to=none", "progress_bar=false", "max_train_steps=2", "checkpointing_steps=0", "tuning=lora", "lora_rank=4"]
    out = tmp_path / "ddp"
    # The shipped 2-process CPU launcher config.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO, "train", "accelerate_configs", "cpu_2proc.yaml"), "--main_process_port", str(29500 + os.getpid() % 1000),
           os.path.join(REPO, "train", "train.py"), "--config", ppd, f"output_dir={out}", "train_batch_size=1", *common]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out / "training_summary.json") as f:
        summary = json.load(f)
    assert summary["num_processes"] == 2 and summary["global_step"] == 2
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors")

    single = tmp_path / "single"
    PreferenceTrainer(TrainConfig.from_yaml(ppd, [f"output_dir={single}", "train_batch_size=2", *common])).train()
    assert read_losses(out) == pytest.approx(read_losses(single), abs=1e-5)
    for name in ("user_encoder_head.safetensors", "user_attention.safetensors", "pytorch_lora_weights.safetensors"):
        got, want = load_file(str(out / name)), load_file(str(single / name))
        assert set(got) == set(want)
        for key in want:
            # Synced: <= 2e-5 (Adam on near-zero user-key gradients amplifies reduction-order noise);
            # the head without its all-reduce was off by 1.5e-3 (checked by disabling it).
            torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=0, msg=f"{name}: {key}")


# --- real data paths ---------------------------------------------------------------------------------
def _pickapic_parquet(path, n=4, corrupt_row=None):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(colour, size=(40, 32)):
        buf = io.BytesIO()
        Image.new("RGB", size, colour).save(buf, format="PNG")
        return buf.getvalue()

    jpg_1 = [png((0, 0, 255)) for _ in range(n)]
    if corrupt_row is not None:
        jpg_1[corrupt_row] = jpg_1[corrupt_row][:40]  # truncated PNG
    table = pa.table({
        "caption": [f"a red square {i}" for i in range(n)],
        "jpg_0": pa.array([png((255, 0, 0)) for _ in range(n)], pa.binary()),
        "jpg_1": pa.array(jpg_1, pa.binary()),
        "label_0": pa.array([1.0, 0.0] * (n // 2), pa.float64()),
    })
    pq.write_table(table, str(path))
    return str(path)


def test_trains_from_pickapic_parquet_and_from_the_latent_cache(tmp_path):
    from diffalign.data import build_cache, load_preference_dataset
    from diffalign.families import load_family

    data = _pickapic_parquet(tmp_path / "pairs.parquet")
    hf = str(tmp_path / "hf")
    direct = tiny(tmp_path, "direct", dataset=data, resolution=32, max_train_steps=2, hf_cache_dir=hf)
    assert PreferenceTrainer(direct).train()["global_step"] == 2

    cache = tmp_path / "cache"
    ds = load_preference_dataset(data, resolution=32, cache_dir=hf)
    build_cache(ds, load_family("tiny:sdxl", seed=0), cache, batch_size=2, progress=False)
    cfg = tiny(tmp_path, "cached", latent_cache=str(cache), resolution=32, max_train_steps=2, prompt_dropout=0.5)
    trainer = PreferenceTrainer(cfg)
    assert trainer.dataset.k == 2 and len(trainer.dataset) == 4
    assert trainer.train()["global_step"] == 2
    with pytest.raises(Exception, match="resolution"):
        PreferenceTrainer(tiny(tmp_path, "wrongres", latent_cache=str(cache), resolution=64))


def test_bad_rows_fail_or_are_skipped_and_counted(tmp_path):
    from diffalign.data import DataError

    data = _pickapic_parquet(tmp_path / "bad.parquet", n=6, corrupt_row=3)
    with pytest.raises(DataError, match="row 3"):
        PreferenceTrainer(tiny(tmp_path, "strict", dataset=data, resolution=32, max_train_steps=3, train_batch_size=1,
                               hf_cache_dir=str(tmp_path / "hf"))).train()
    summary = PreferenceTrainer(tiny(tmp_path, "skip", dataset=data, resolution=32, max_train_steps=3, train_batch_size=1,
                                     skip_bad_rows=True, hf_cache_dir=str(tmp_path / "hf"))).train()
    assert summary["skipped_rows"] == 1


def test_options_bf16_ema_adafactor_accumulation_and_resume(tmp_path):
    """bf16 autocast (CPU), EMA, Adafactor, gradient accumulation, checkpointing and a cosine schedule
    together; a resume from the mid-run checkpoint (EMA state included) replays the same losses."""
    kw = dict(mixed_precision="bf16", use_ema=True, ema_decay=0.9, optimizer="adafactor", gradient_accumulation_steps=2,
              gradient_checkpointing=True, lr_scheduler="cosine", lr_warmup_steps=1, max_train_steps=4, checkpointing_steps=2,
              train_batch_size=1)
    first = PreferenceTrainer(tiny(tmp_path, "opts", **kw))
    assert first.reference is None and next(first.unwrapped.parameters()).dtype == torch.bfloat16  # LoRA base in bf16
    assert all(p.dtype == torch.float32 for p in first.trainable)
    first.train()
    full = read_losses(tmp_path / "opts")
    assert len(full) == 4 and all(math.isfinite(v) for v in full.values())
    # The EMA is saved as safetensors (accelerate's register_for_checkpointing would unpickle it on resume).
    assert os.path.isfile(tmp_path / "opts" / "checkpoint-2" / "ema_state.safetensors")
    assert not glob.glob(str(tmp_path / "opts" / "checkpoint-2" / "custom_checkpoint_*.pkl"))
    first_ema = first.ema.state_dict()
    import shutil

    shutil.rmtree(tmp_path / "opts" / "checkpoint-4")
    os.remove(tmp_path / "opts" / "losses.jsonl")
    resumed = PreferenceTrainer(tiny(tmp_path, "opts", resume_from_checkpoint="latest", **kw))
    again = resumed.train()
    assert again["resumed_from_step"] == 2
    replay = read_losses(tmp_path / "opts")
    for step in (3, 4):
        assert replay[step] == pytest.approx(full[step], abs=1e-5)
    # The EMA resumed from step 2 too: EMAModel's own state_dict ends where the uninterrupted run's did.
    resumed_ema = resumed.ema.state_dict()
    shadow, first_shadow = resumed_ema.pop("shadow_params"), first_ema.pop("shadow_params")
    assert resumed_ema == first_ema and resumed_ema["optimization_step"] == 4
    for a, b in zip(shadow, first_shadow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_diffalign_train_cli(tmp_path, capsys):
    from diffalign.cli import main

    tiny_cfg = os.path.join(REPO, "train", "configs", "tiny_sd3_rankdpo.yaml")
    assert main(["train", "--config", tiny_cfg, "--print_config", "beta=10", f"output_dir={tmp_path}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["beta"] == 10.0 and printed["objective"] == "rankdpo" and printed["output_dir"] == str(tmp_path)
    # Every field is a flag too: `--key value`, `--key=value`, a bare boolean flag, lists; key=value still works.
    assert main(["train", "--config", tiny_cfg, "--print_config", "--beta", "10", "--objective=dpo", "--use_ema",
                 "--validation_prompts", "a cat", "a dog"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["beta"], printed["objective"], printed["use_ema"]) == (10.0, "dpo", True)
    assert printed["validation_prompts"] == ["a cat", "a dog"]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    listed = capsys.readouterr().out
    from dataclasses import fields

    missing = [f.name for f in fields(TrainConfig) if f"--{f.name}" not in listed or not f.metadata.get("help")]
    assert missing == [] and "{dpo,ipo,hinge,rankdpo,sft,ppd}" in listed
    capsys.readouterr()
    assert main(["train", "--config", tiny_cfg, "betta=10"]) == 2  # an expected error: one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("diffalign train: error: unknown config key(s) ['betta']") and "Traceback" not in err
    with pytest.raises(ValueError, match="Valid keys"):
        main(["--debug", "train", "--config", tiny_cfg, "betta=10"])


def test_a_conditioning_hook_subclasses_the_interface(tmp_path):
    from diffalign.personalization import PPDConditioning

    assert issubclass(PPDConditioning, ConditioningHook)

    class DuckTypedHook:  # the first, 3-method interface: no longer accepted silently
        def policy_context(self, model, batch): ...

    with pytest.raises(TypeError, match="must subclass diffalign.training.ConditioningHook"):
        PreferenceTrainer(tiny(tmp_path), conditioning=DuckTypedHook())


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_init_lora_continues_or_merges_an_earlier_lora(tmp_path, family):
    """Iterative rounds: continue = policy starts at base + LoRA, reference the base; merge = the LoRA is fused into
    the base (the reference), and a fresh adapter starts at zero on top."""
    from diffalign.testing import tiny_sd3_pipeline, tiny_sdxl_pipeline
    from diffalign.training.trainer import adapters_disabled

    kw = dict(lora_rank=4, lora_alpha=8, learning_rate=1e-2)
    if family == "sd3":
        kw.update(pretrained_model_name_or_path="tiny:sd3", resolution=32)
    first = tiny(tmp_path, "first", max_train_steps=2, **kw)
    PreferenceTrainer(first).train()
    pipe = (tiny_sd3_pipeline if family == "sd3" else tiny_sdxl_pipeline)(first.model_seed)
    denoiser_of = lambda p: getattr(p, "transformer" if family == "sd3" else "unet")  # noqa: E731
    pipe.load_lora_weights(first.output_dir)

    def outputs(trainer, model):
        adapter = trainer.adapter
        size = first.resolution // adapter.vae_scale_factor
        x = torch.randn(1, 4 if family == "sdxl" else model.config.in_channels, size, size, generator=torch.Generator().manual_seed(1))
        text = adapter.encode_prompts(["a red square"])
        micro = adapter.micro_conditioning(torch.tensor([[64, 64]]), torch.tensor([[0, 0]]), (first.resolution,) * 2)
        with torch.no_grad():
            return adapter.predict(model, x, torch.tensor([500]), text, micro)

    cont = PreferenceTrainer(tiny(tmp_path, "continue", init_lora=first.output_dir, **kw))
    merged = PreferenceTrainer(tiny(tmp_path, "merge", init_lora=first.output_dir, init_lora_merge=True, **kw))
    fresh = PreferenceTrainer(tiny(tmp_path, "fresh", **kw))
    with_lora = outputs(cont, denoiser_of(pipe))
    with adapters_disabled(denoiser_of(pipe)):
        base = outputs(cont, denoiser_of(pipe))
    assert not torch.allclose(with_lora, base, atol=1e-4)
    torch.testing.assert_close(outputs(cont, cont.unwrapped), with_lora, atol=1e-5, rtol=1e-4)
    with adapters_disabled(cont.unwrapped):
        torch.testing.assert_close(outputs(cont, cont.unwrapped), base, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs(merged, merged.unwrapped), with_lora, atol=1e-5, rtol=1e-4)
    with adapters_disabled(merged.unwrapped):
        torch.testing.assert_close(outputs(merged, merged.unwrapped), with_lora, atol=1e-5, rtol=1e-4)
    with adapters_disabled(fresh.unwrapped):
        torch.testing.assert_close(outputs(fresh, fresh.unwrapped), base, atol=1e-5, rtol=1e-4)
    # Only the new adapter trains, and it saves alone (no trace of the init adapter).
    assert list(merged.unwrapped.peft_config) == ["default"] and list(cont.unwrapped.peft_config) == ["default"]
    cont.train()
    assert os.path.isfile(os.path.join(cont.config.output_dir, "pytorch_lora_weights.safetensors"))

    with pytest.raises(ValueError, match="rank 4 and alpha 8"):
        PreferenceTrainer(tiny(tmp_path, "wrong_rank", init_lora=first.output_dir, **{**kw, "lora_rank": 8}))
    with pytest.raises(FileNotFoundError, match="init_lora"):
        PreferenceTrainer(tiny(tmp_path, "missing", init_lora=str(tmp_path / "nothing"), **kw))
    with pytest.raises(ValueError, match="needs init_lora"):
        tiny(tmp_path, "x", init_lora_merge=True)


def test_lora_reference_is_the_base_and_adapters_come_back(tmp_path):
    from diffalign.data.synthetic import SyntheticPreferenceDataset
    from diffalign.testing import tiny_sdxl_pipeline
    from diffalign.training.sampling import collate_keyed

    trainer = PreferenceTrainer(tiny(tmp_path, learning_rate=5e-2, max_train_steps=2))
    trainer.train()
    data = SyntheticPreferenceDataset(4, resolution=64)
    batch = collate_keyed([{**data[i], "group_key": (0, i)} for i in range(2)])
    inputs = trainer.prepare_inputs(batch)
    base_unet = tiny_sdxl_pipeline(trainer.config.model_seed).unet
    ref = trainer.reference_prediction(batch, inputs)
    with torch.no_grad():
        base = trainer.adapter.predict(base_unet, inputs["x_t"], inputs["timesteps"], inputs["text"], inputs["micro"])
        policy = trainer.adapter.predict(trainer.unwrapped, inputs["x_t"], inputs["timesteps"], inputs["text"], inputs["micro"])
    torch.testing.assert_close(ref, base, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(policy, base, atol=1e-4)  # the adapters are back on after the reference pass ...
    assert all(p.requires_grad for n, p in trainer.unwrapped.named_parameters() if "lora_" in n)  # ... and train
