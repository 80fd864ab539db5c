import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.objectives import compute, dpo, rank_dpo, ranks_from, sft


def _errors(batch, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(batch, k, generator=g, dtype=dtype) * 0.2,
        torch.rand(batch, k, generator=g, dtype=dtype) * 0.2,
    )


def test_dpo_matches_hand_computation():
    """Two pairs, beta=1000.

    pair 0: e_w=0.10, e_l=0.20, r_w=0.15, r_l=0.15 -> logits = -500 * ((0.10-0.20) - 0) = 50
    pair 1: e_w=0.30, e_l=0.25, r_w=0.20, r_l=0.20 -> logits = -500 * (0.05 - 0) = -25
    loss = mean(-logsigmoid(50), -logsigmoid(-25)) = (1.93e-22 + 25.0) / 2 ~= 12.5
    implicit accuracy = 1/2
    """
    err_policy = torch.tensor([[0.10, 0.20], [0.30, 0.25]])
    err_ref = torch.tensor([[0.15, 0.15], [0.20, 0.20]])
    loss, metrics = dpo(err_policy, err_ref, beta=1000.0)
    expected = (math.log1p(math.exp(-50.0)) + 25.0 + math.log1p(math.exp(-25.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["implicit_acc"].item() == 0.5
    assert metrics["logits"].item() == pytest.approx((50 - 25) / 2, rel=1e-5)
    # implicit reward -beta*s: pair 0 chosen s=-0.05 -> 50; pair 1 chosen s=0.10 -> -100
    assert metrics["rewards/chosen"].item() == pytest.approx((50 - 100) / 2, rel=1e-5)
    assert metrics["drift/chosen"].item() == pytest.approx((-0.05 + 0.10) / 2, rel=1e-5)
    assert metrics["drift/rejected"].item() == pytest.approx((0.05 + 0.05) / 2, rel=1e-5)


def test_dpo_reproduces_published_formula():
    # The Diffusion-DPO training script's computation, written out term by term.
    err_policy, err_ref = _errors(16, 2, seed=1)
    beta = 5000.0
    model_diff = err_policy[:, 0] - err_policy[:, 1]
    ref_diff = err_ref[:, 0] - err_ref[:, 1]
    inside_term = -0.5 * beta * (model_diff - ref_diff)
    expected = -F.logsigmoid(inside_term).mean()
    loss, metrics = dpo(err_policy, err_ref)
    torch.testing.assert_close(loss, expected)
    assert metrics["implicit_acc"].item() == pytest.approx((inside_term > 0).float().mean().item())


def test_dpo_hinge_and_ipo():
    err_policy = torch.tensor([[0.10, 0.20]])
    err_ref = torch.tensor([[0.15, 0.15]])
    beta = 10.0
    logits = -0.5 * beta * ((0.10 - 0.20) - 0.0)  # 0.5
    hinge, _ = dpo(err_policy, err_ref, beta=beta, loss_type="hinge")
    assert hinge.item() == pytest.approx(1 - logits, rel=1e-6)
    ipo, _ = dpo(err_policy, err_ref, beta=beta, loss_type="ipo")
    assert ipo.item() == pytest.approx((logits / beta - 1 / (2 * beta)) ** 2, rel=1e-5)


def test_dpo_soft_labels_for_ties():
    err_policy, err_ref = _errors(4, 2, seed=2)
    logits = -0.5 * 100.0 * ((err_policy[:, 0] - err_policy[:, 1]) - (err_ref[:, 0] - err_ref[:, 1]))
    labels = torch.tensor([1.0, 0.5, 1.0, 0.5])
    loss, _ = dpo(err_policy, err_ref, beta=100.0, labels=labels)
    expected = (labels * -F.logsigmoid(logits) + (1 - labels) * -F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="soft labels"):
        dpo(err_policy, err_ref, loss_type="hinge", labels=labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_dpo_k2_without_weighting_equals_dpo(seed):
    err_policy, err_ref = _errors(8, 2, seed=seed)
    scores = torch.tensor([[1.0, 0.0]]).repeat(8, 1)
    expected, _ = dpo(err_policy, err_ref, beta=5000.0)
    loss, _ = rank_dpo(err_policy, err_ref, scores, beta=5000.0, weighting="none")
    assert abs(loss.item() - expected.item()) < 1e-6


def test_rank_dpo_k2_follows_scores_not_column_order():
    err_policy, err_ref = _errors(8, 2, seed=3)
    swapped = rank_dpo(err_policy.flip(1), err_ref.flip(1), torch.tensor([[0.0, 1.0]]).repeat(8, 1), weighting="none")[0]
    expected = dpo(err_policy, err_ref)[0]
    assert abs(swapped.item() - expected.item()) < 1e-6


def test_rank_dpo_k4_hand_worked_example():
    """k=4, beta=2 (so a pair's logit is s_j - s_i), one group, columns deliberately out of order.

    column:            c0      c1      c2      c3
    phi (scores):      1/3     1       0       2/3
    rank:              3       1       4       2
    G = 2^phi - 1:     0.25992 1       0       0.58740
    1/D = 1/log2(1+r): 0.5     1       0.43068 0.63093
    s = e_pol - e_ref: 0       -0.5    0.5     0

    pair (above, below)  Delta = |dG| * |d(1/D)|       logit   -logsigmoid(logit)
    (c1, c3)             0.41260 * 0.36907 = 0.152278  0.5     0.474077
    (c1, c0)             0.74008 * 0.5     = 0.370040  0.5     0.474077
    (c1, c2)             1       * 0.56932 = 0.569323  1.0     0.313262
    (c3, c0)             0.32748 * 0.13093 = 0.042877  0.0     0.693147
    (c3, c2)             0.58740 * 0.20025 = 0.117629  0.5     0.474077
    (c0, c2)             0.25992 * 0.06932 = 0.018019  0.5     0.474077

    loss = sum(Delta * -logsigmoid) = 0.311926 + 0.178347 + 0.029720 = 0.519993
    """
    scores = torch.tensor([[1 / 3, 1.0, 0.0, 2 / 3]], dtype=torch.float64)
    err_ref = torch.full((1, 4), 0.1, dtype=torch.float64)
    err_policy = err_ref + torch.tensor([[0.0, -0.5, 0.5, 0.0]], dtype=torch.float64)
    assert ranks_from(scores).tolist() == [[3, 1, 4, 2]]
    loss, metrics = rank_dpo(err_policy, err_ref, scores, beta=2.0)
    assert loss.item() == pytest.approx(0.519993, abs=2e-6)
    # The ranking is fully respected by the implied rewards except the (c3, c0) tie at logit 0.
    assert metrics["implicit_acc"].item() == pytest.approx(5 / 6)


def test_rank_dpo_predicted_discounts_use_model_order():
    scores = torch.tensor([[1.0, 0.5, 0.0]])
    err_ref = torch.zeros(1, 3)
    # Policy order agrees with the true order: predicted discounts equal true discounts.
    agree = torch.tensor([[-0.3, -0.2, -0.1]])
    a, _ = rank_dpo(agree, err_ref, scores, beta=2.0, discount_from="true")
    b, _ = rank_dpo(agree, err_ref, scores, beta=2.0, discount_from="predicted")
    assert a.item() == pytest.approx(b.item(), abs=1e-7)
    # Reversed policy order: the discounts change, so does the loss.
    reverse = agree.flip(1)
    c, _ = rank_dpo(reverse, err_ref, scores, beta=2.0, discount_from="true")
    d, _ = rank_dpo(reverse, err_ref, scores, beta=2.0, discount_from="predicted")
    assert c.item() != pytest.approx(d.item(), abs=1e-4)


def test_rank_dpo_ties_in_scores_get_zero_dcg_weight():
    err_policy, err_ref = _errors(1, 2, seed=4)
    loss, _ = rank_dpo(err_policy, err_ref, torch.tensor([[0.5, 0.5]]))
    assert loss.item() == 0.0


def test_rank_dpo_tied_samples_form_no_pair():
    # Samples 1 and 2 tie: without weighting they must not be trained in stored order, and the metrics count
    # only the two real pairs (0 over 1, 0 over 2).
    err_policy, err_ref = _errors(1, 3, seed=5)
    scores = torch.tensor([[1.0, 0.5, 0.5]])
    loss, metrics = rank_dpo(err_policy, err_ref, scores, beta=3.0, weighting="none")
    s = err_policy - err_ref
    expected = sum(-F.logsigmoid(-0.5 * 3.0 * (s[0, 0] - s[0, j])) for j in (1, 2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["implicit_acc"].item() in (0.0, 0.5, 1.0)
    all_tied, tied_metrics = rank_dpo(err_policy, err_ref, torch.full((1, 3), 0.5), weighting="none")
    assert all_tied.item() == 0.0 and tied_metrics["implicit_acc"].item() == 0.0


def test_sft_takes_best_sample():
    err_policy = torch.tensor([[0.3, 0.1, 0.2], [0.5, 0.6, 0.7]])
    scores = torch.tensor([[0.0, 1.0, 0.5], [0.2, 0.2, 0.1]])  # tie in row 1 -> first column
    loss, _ = sft(err_policy, scores)
    assert loss.item() == pytest.approx((0.1 + 0.5) / 2)
    loss0, _ = sft(err_policy)
    assert loss0.item() == pytest.approx((0.3 + 0.5) / 2)


def test_gradcheck_float64():
    err_policy, err_ref = _errors(3, 4, seed=5, dtype=torch.float64)
    scores = torch.tensor([[1.0, 0.2, 0.5, 0.0], [0.3, 0.3, 1.0, 0.6], [0.0, 0.1, 0.2, 0.3]], dtype=torch.float64)
    policy = err_policy.clone().requires_grad_(True)
    for weighting in ("dcg", "none"):
        assert torch.autograd.gradcheck(lambda ep, w=weighting: rank_dpo(ep, err_ref, scores, beta=10.0, weighting=w)[0], (policy,))
    assert torch.autograd.gradcheck(lambda ep: sft(ep, scores)[0], (policy,))
    pair_policy = err_policy[:, :2].clone().requires_grad_(True)
    for loss_type in ("sigmoid", "hinge", "ipo"):
        assert torch.autograd.gradcheck(
            lambda ep, lt=loss_type: dpo(ep, err_ref[:, :2], beta=10.0, loss_type=lt)[0], (pair_policy,)
        )


def test_low_precision_inputs_are_computed_in_float32():
    err_policy, err_ref = _errors(4, 2, seed=6)
    loss_bf16, _ = dpo(err_policy.bfloat16(), err_ref.bfloat16())
    assert loss_bf16.dtype == torch.float32
    expected, _ = dpo(err_policy.bfloat16().float(), err_ref.bfloat16().float())
    torch.testing.assert_close(loss_bf16, expected)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: dpo(torch.rand(4, 3), torch.rand(4, 3)), "k=2"),
        (lambda: dpo(torch.rand(4, 2), torch.rand(3, 2)), "does not match"),
        (lambda: dpo(torch.rand(4), torch.rand(4)), "shape \\(B, k\\)"),
        (lambda: dpo(torch.tensor([[0.1, float("nan")]]), torch.rand(1, 2)), "non-finite"),
        (lambda: dpo(torch.rand(2, 2), torch.rand(2, 2), beta=0.0), "beta"),
        (lambda: dpo(torch.rand(2, 2), torch.rand(2, 2), loss_type="kto"), "loss_type"),
        (lambda: rank_dpo(torch.rand(2, 1), torch.rand(2, 1), torch.rand(2, 1)), "k >= 2"),
        (lambda: rank_dpo(torch.rand(2, 3), torch.rand(2, 3), torch.rand(2, 3) + 1.5), "\\[0, 1\\]"),
        (lambda: rank_dpo(torch.rand(2, 3), torch.rand(2, 3), torch.rand(2, 4)), "scores shape"),
        (lambda: rank_dpo(torch.rand(2, 3), torch.rand(2, 3), torch.rand(2, 3), weighting="ndcg"), "weighting"),
        (lambda: rank_dpo(torch.rand(2, 3), torch.rand(2, 3), torch.rand(2, 3), discount_from="x"), "discount_from"),
        (lambda: compute("kto", torch.rand(2, 2), torch.rand(2, 2), torch.rand(2, 2)), "unknown objective"),
        (lambda: compute("dpo", torch.rand(2, 3), torch.rand(2, 3), torch.rand(2, 3)), "pairwise"),
        (lambda: compute("dpo", torch.rand(2, 2), None, torch.rand(2, 2)), "err_ref"),
        (lambda: compute("dpo", torch.rand(1, 2), torch.rand(1, 2), torch.tensor([[0.0, 1.0]])), "column 0"),
        (lambda: compute("ipo", torch.rand(1, 2), torch.rand(1, 2), torch.tensor([[0.5, 0.5]])), "tied"),
    ],
)
def test_bad_input_names_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_compute_dispatches():
    err_policy, err_ref = _errors(4, 2, seed=7)
    scores = torch.tensor([[1.0, 0.0]] * 3 + [[0.5, 0.5]])
    loss, _ = compute("dpo", err_policy, err_ref, scores, beta=100.0)
    expected, _ = dpo(err_policy, err_ref, beta=100.0, labels=torch.tensor([1.0, 1.0, 1.0, 0.5]))
    torch.testing.assert_close(loss, expected)
    hinge, _ = compute("hinge", err_policy[:3], err_ref[:3], scores[:3], beta=100.0)
    torch.testing.assert_close(hinge, dpo(err_policy[:3], err_ref[:3], beta=100.0, loss_type="hinge")[0])
    ranked, _ = compute("rankdpo", err_policy, err_ref, scores, beta=100.0, weighting="none")
    assert torch.isfinite(ranked)
    sft_loss, _ = compute("sft", err_policy, None, scores)
    torch.testing.assert_close(sft_loss, err_policy[:, 0].mean())


def test_one_objective_registry_feeds_the_config():
    import typing

    from diffalign.objectives import REGISTRY, objective_kwargs
    from diffalign.training import TrainConfig

    # The field's choices are the registry's when diffalign.training was imported (later registrations validate too).
    assert set(REGISTRY) <= set(typing.get_args(typing.get_type_hints(TrainConfig)["objective"]))
    assert {n: s.needs_reference for n, s in REGISTRY.items()}["sft"] is False
    cfg = TrainConfig(objective="rankdpo", beta=7.0, rank_weighting="none")
    assert objective_kwargs("rankdpo", cfg) == {"beta": 7.0, "weighting": "none", "discount_from": cfg.discount_from}
    assert objective_kwargs("sft", cfg) == {} and TrainConfig(objective="ppd").loss_name == "dpo"
    # One way to ask for IPO: the objective's name.
    assert TrainConfig(objective="ipo").loss_name == "ipo"
    with pytest.raises(ValueError, match="loss_type is gone: ask for objective=ipo"):
        TrainConfig.from_dict({"objective": "dpo", "loss_type": "ipo"})
