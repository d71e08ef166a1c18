"""greenprop.fl: partitions, FedProx/FedSpeed local steps, GradSamp strategies in Strategy.start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from greenprop.errors import GreenpropError
from greenprop.fl import local
from greenprop.fl.partitions import dirichlet_partition, iid_partition, parse_partition
from greenprop.fl.strategies import make_strategy


# -- partitions ------------------------------------------------------------------------------
def test_dirichlet_sizes_sum_and_reproducible():
    labels = np.random.default_rng(0).integers(0, 10, 3000)
    parts = dirichlet_partition(labels, 10, 0.6, seed=3)
    assert sum(len(p) for p in parts) == 3000
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(3000))
    again = dirichlet_partition(labels, 10, 0.6, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(
        np.array_equal(a, b) for a, b in zip(parts, dirichlet_partition(labels, 10, 0.6, 4), strict=True)
    )


def test_dirichlet_alpha_honoured():
    """Per class, client shares ~ Dir(alpha): each marginal is Beta(alpha, (K-1) alpha); KS test."""
    labels = np.repeat(np.arange(10), 2000)
    shares = []
    for seed in range(20):
        parts = dirichlet_partition(labels, 5, 0.6, seed=seed)
        for cls in range(10):
            shares.extend(np.sum(labels[p] == cls) / 2000 for p in parts)
    assert stats.kstest(shares, stats.beta(0.6, 4 * 0.6).cdf).pvalue > 0.01
    assert stats.kstest(shares, stats.beta(5.0, 20.0).cdf).pvalue < 1e-6  # a wrong alpha is rejected


def test_iid_partition_and_bad_specs():
    parts = iid_partition(103, 10, seed=0)
    assert sorted(len(p) for p in parts)[0] >= 10 and sum(map(len, parts)) == 103
    assert parse_partition("dirichlet:0.6") == ("dirichlet", 0.6)
    for bad in ("dirichlet:0", "dirichlet:x", "skew"):
        with pytest.raises(GreenpropError, match="partition="):
            parse_partition(bad)
    with pytest.raises(GreenpropError, match="clients=0"):
        iid_partition(10, 0, seed=0)


# -- client-side terms -----------------------------------------------------------------------
def _tiny():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5]])
    return model, (lambda m: ((m(x) - y) ** 2).mean()), x, y


def test_prox_term_squared_and_nonzero_after_step():
    model, loss_fn, _, _ = _tiny()
    glob = local.snapshot(model)
    assert float(local.prox_term(model, glob, 0.1).detach()) == 0.0
    local.sgd_step(model, loss_fn, lr=0.1, global_weights=glob, mu=0.1)
    diff = model.weight.detach() - glob[0]
    term = local.prox_term(model, glob, 0.1)
    assert float(term.detach()) > 0
    assert float(term.detach()) == pytest.approx(0.05 * float((diff**2).sum()), rel=1e-6)
    # gradient flows only to the live weights: d/dw = mu (w - w_t)
    model.zero_grad()
    local.prox_term(model, glob, 0.1).backward()
    assert torch.allclose(model.weight.grad, 0.1 * diff)
    assert glob[0].grad is None


def test_fedspeed_step_hand_computed():
    model, loss_fn, x, y = _tiny()
    w0 = model.weight.detach().clone()
    glob = local.snapshot(model)
    corr = [torch.tensor([[0.1, -0.1]])]
    lr, lam, rho, alpha = 0.1, 2.0, 0.05, 0.5
    # by hand: f(w) = (w.x - y)^2, grad = 2 (w.x - y) x
    g1 = 2 * (w0 @ x.T - y) * x
    wp = w0 + rho * g1 / g1.norm()
    g2 = 2 * (wp @ x.T - y) * x
    quasi = (1 - alpha) * g1 + alpha * g2
    w1 = w0 - lr * (quasi - corr[0] + (w0 - w0) / lam)
    local.fedspeed_step(model, loss_fn, lr, glob, corr, lam=lam, rho=rho, alpha=alpha)
    assert torch.allclose(model.weight.detach(), w1, atol=1e-6)
    # second step: the prox term (x - x_t)/lam now acts
    g1 = 2 * (w1 @ x.T - y) * x
    wp = w1 + rho * g1 / g1.norm()
    g2 = 2 * (wp @ x.T - y) * x
    w2 = w1 - lr * ((1 - alpha) * g1 + alpha * g2 - corr[0] + (w1 - w0) / lam)
    local.fedspeed_step(model, loss_fn, lr, glob, corr, lam=lam, rho=rho, alpha=alpha)
    assert torch.allclose(model.weight.detach(), w2, atol=1e-6)
    new_corr, sent = local.fedspeed_finish(model, glob, corr, lam)
    expect_corr = corr[0] - (w2 - w0) / lam
    assert torch.allclose(new_corr[0], expect_corr, atol=1e-6)
    assert torch.allclose(sent[0], w2 - lam * expect_corr, atol=1e-6)


# -- strategies inside Flower's own Strategy.start ----------------------------------------------
@pytest.fixture(autouse=True)
def _task_identity():
    """Messages need a task identity (Flower's runtimes set it); a fixed one for in-process tests."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


class FakeGrid:
    """A Grid that runs 'clients' in-process: each moves every weight by (node_id * 0.01 + noise)."""

    def __init__(self, nodes=3):
        self.nodes = list(range(1, nodes + 1))
        self.sent: list[list[Message]] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent.append(messages)
        replies = []
        for msg in messages:
            if msg.metadata.message_type != "train":
                continue
            state = msg.content["arrays"].to_torch_state_dict()
            g = torch.Generator().manual_seed(
                msg.metadata.dst_node_id + 100 * int(msg.content["config"]["server-round"])
            )
            new = {
                k: v + 0.01 * msg.metadata.dst_node_id + 0.01 * torch.randn(v.shape, generator=g)
                for k, v in state.items()
            }
            content = RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": 10})})
            replies.append(Message(content, reply_to=msg))
        return replies


def _run(strategy, rounds=4):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    start = ArrayRecord(model.state_dict())
    grid = FakeGrid()
    history = []
    calls = []
    original = strategy.aggregate_train

    def spy(server_round, replies):
        replies = list(replies)
        calls.append((server_round, len(replies)))
        out = original(server_round, replies)
        history.append(out[0].to_torch_state_dict())
        return out

    strategy.aggregate_train = spy
    strategy.start(grid=grid, initial_arrays=start, num_rounds=rounds)
    return grid, history, calls


def test_sampled_round_sends_nothing_and_moves_by_a_draw():
    strat = make_strategy(
        "fedavg", sampling="pe:1", num_rounds=4, seed=0, fraction_train=1.0, fraction_evaluate=0.0
    )
    grid, history, calls = _run(strat)
    sampled = [r for r, info in strat.rounds.items() if info["sampled"]]
    assert sampled == [2]  # pe:1 over 4 rounds: 1 real, 2 sampled, 3 real, 4 last real
    # Strategy.start (flwr 1.42) still calls aggregate_train with no replies
    assert (2, 0) in calls
    train_batches = [b for b in grid.sent if b and b[0].metadata.message_type == "train"]
    assert len(train_batches) == 3 and [len(b) for b in grid.sent if b][:1] == [3]
    assert strat.rounds[2]["bytes_down"] == 0 and strat.rounds[2]["bytes_up"] == 0
    assert strat.rounds[1]["bytes_down"] > 0 and strat.rounds[1]["bytes_up"] > 0
    moved = history[1]["weight"] - history[0]["weight"]
    assert float(moved.abs().max()) > 0  # the global model changed
    torch.manual_seed(0)
    first_delta = history[0]["weight"] - torch.nn.Linear(4, 3).weight.detach()
    assert not torch.allclose(moved, first_delta)  # a draw, not a repeat of the real update
    assert float(moved.abs().max()) <= float(first_delta.abs().max()) + 1e-6  # clamped (safe default)


def test_unsampled_rounds_equal_plain_fedavg_and_prox():
    for name in ("fedavg", "fedprox"):
        kw = {
            "num_rounds": 4,
            "seed": 5,
            "fraction_train": 0.67,
            "fraction_evaluate": 0.0,
            "min_train_nodes": 1,
        }
        _, plain, _ = _run(make_strategy(name, sampling="none", **kw))
        _, gs, _ = _run(make_strategy(name, sampling="pe:2", **kw))
        # pe:2 over 4 rounds samples round 3 only; rounds 1-2 are identical to the plain run
        for r in (0, 1):
            for k in plain[r]:
                assert torch.equal(plain[r][k], gs[r][k])
        assert not torch.equal(plain[2]["weight"], gs[2]["weight"])


def test_prox_sends_mu_and_client_sampling_is_seeded():
    strat = make_strategy(
        "fedprox",
        num_rounds=2,
        seed=1,
        proximal_mu=0.3,
        fraction_train=0.5,
        min_train_nodes=1,
        fraction_evaluate=0.0,
    )
    grid, _, _ = _run(strat, rounds=2)
    msg = grid.sent[0][0]
    assert msg.content["config"]["proximal-mu"] == 0.3
    again = make_strategy(
        "fedprox",
        num_rounds=2,
        seed=1,
        proximal_mu=0.3,
        fraction_train=0.5,
        min_train_nodes=1,
        fraction_evaluate=0.0,
    )
    grid2, _, _ = _run(again, rounds=2)
    dst = [[m.metadata.dst_node_id for m in b] for b in grid.sent if b]
    assert dst == [[m.metadata.dst_node_id for m in b] for b in grid2.sent if b]


def test_bad_options_name_the_option():
    with pytest.raises(GreenpropError, match="strategy='fedfoo'"):
        make_strategy("fedfoo", num_rounds=3)
    with pytest.raises(GreenpropError, match="sampling='pe:x'"):
        make_strategy("fedavg", sampling="pe:x", num_rounds=3)
    with pytest.raises(GreenpropError, match="mu=0"):
        make_strategy("fedprox", num_rounds=3, proximal_mu=0)
    with pytest.raises(GreenpropError, match="lam=-1"):
        make_strategy("fedspeed", num_rounds=3, lam=-1)


# -- FedSpeed's client state on nodes shared by several runs ----------------------------------
def _client_round(context, settings, server_round, arrays):
    """One FedSpeed client round of ``settings`` on ``context``'s node; the weights it sends."""
    from flwr.app import ConfigRecord, MessageType

    from greenprop.fl.app import train

    config = ConfigRecord({**settings.config(), "server-round": server_round})
    msg = Message(
        RecordDict({"arrays": arrays, "config": config}), dst_node_id=1, message_type=MessageType.TRAIN
    )
    return train(msg, context).content["arrays"].to_torch_state_dict()


def test_fedspeed_correction_does_not_leak_between_runs_sharing_a_node():
    """A sweep's jobs share SuperNodes (one ``context.state``); each run's correction is its own.

    Before e291ff4 the correction sat under one fixed key and was used whenever present, so
    run A's round 1 started from run B's correction and B's rounds overwrote A's.
    """
    from dataclasses import replace

    from flwr.app import Context

    from greenprop.fl.app import FLSettings, _model

    a = FLSettings(
        strategy="fedspeed",
        dataset="digits",
        model="mlp",
        clients=2,
        subset=200,
        test_subset=50,
        rounds=3,
        batch_size=16,
        seed=0,
    )
    b = replace(a, seed=1)  # another job of the same sweep
    start = ArrayRecord(_model(a).state_dict())

    def node():
        return Context(
            run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
        )

    alone = node()
    ref1, ref2 = _client_round(alone, a, 1, start), _client_round(alone, a, 2, start)
    # the correction matters: round 2 without round 1's correction sends other weights
    no_corr = _client_round(node(), a, 2, start)
    assert any(not torch.equal(ref2[k], no_corr[k]) for k in ref2)

    shared = node()
    _client_round(shared, b, 1, start)
    _client_round(shared, b, 2, start)
    got1 = _client_round(shared, a, 1, start)  # B's correction is on the node already
    _client_round(shared, b, 3, start)  # B goes on between A's rounds
    got2 = _client_round(shared, a, 2, start)
    again1 = _client_round(shared, a, 1, start)  # A rerun: round 1 starts from zero again
    for k in ref1:
        assert torch.equal(got1[k], ref1[k]), k
        assert torch.equal(got2[k], ref2[k]), k
        assert torch.equal(again1[k], ref1[k]), k


# -- the Flower App that `flwr run` deploys --------------------------------------------------
def test_flower_app_folder_is_valid_and_its_run_config_is_the_settings():
    """Flower's own validator accepts the app folder; its run config becomes FLSettings."""
    from flwr.common.config import get_project_config, validate_config

    from greenprop.fl.app import FLSettings
    from greenprop.fl.deploy import APP_DIR, settings_from_run_config

    config = get_project_config(APP_DIR)
    ok, errors, _ = validate_config(config, check_module=True, project_dir=APP_DIR)
    assert ok, errors
    run_config = dict(config["tool"]["flwr"]["app"]["config"])
    run_config.update({"out": "/abs/out", "local-epochs": 2, "sampling": "pe:1"})
    settings, out = settings_from_run_config(run_config)
    assert out == Path("/abs/out")
    assert settings.local_epochs == 2 and settings.sampling == "pe:1" and settings.clients == 3
    assert isinstance(settings, FLSettings)
    with pytest.raises(GreenpropError, match="'epochs': unknown key"):
        settings_from_run_config({**run_config, "epochs": 3})
    with pytest.raises(GreenpropError, match="out='rel/out'"):
        settings_from_run_config({**run_config, "out": "rel/out"})
