import torch

from conftest import assert_rel_close
from fedlora.adapters.ranks import RankProfile
from fedlora.engine.server import Server
from fedlora.strategies.base import (
    ClientInstruction,
    ClientReply,
    ServerSetup,
    check_same_layout,
    weighted_average,
)
from fedlora.strategies.fedavg import FedIT, FedProx, FedProxOptions, ProximalTerm, proximal_term


def random_state(gen: torch.Generator, rank: int = 4) -> dict[str, torch.Tensor]:
    return {
        "m.lora_A.weight": torch.randn(rank, 12, generator=gen),
        "m.lora_B.weight": torch.randn(10, rank, generator=gen),
    }


def setup_for(state: dict[str, torch.Tensor], clients: int = 5, rank: int = 4) -> ServerSetup:
    return ServerSetup(state, {i: RankProfile.uniform(rank) for i in range(clients)}, lora_alpha=16.0)


def test_fedit_aggregate_matches_dense_weighted_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    states = [random_state(gen) for _ in range(5)]
    sizes = [3, 10, 1, 7, 4]
    strategy = FedIT()
    server = Server(strategy, setup_for(states[0]))
    replies = [ClientReply(i, s, n) for i, (s, n) in enumerate(zip(states, sizes))]
    out = server.aggregate(1, replies)
    total = sum(sizes)
    for key in states[0]:
        dense = torch.stack([s[key].double() * n / total for s, n in zip(states, sizes)]).sum(0)
        torch.testing.assert_close(out[key].double(), dense, rtol=1e-6, atol=1e-6)
    # FedIT averages the factors separately; its product is NOT the mean of products (the known bias)
    prod_of_means = out["m.lora_B.weight"] @ out["m.lora_A.weight"]
    mean_of_prods = sum(
        n / total * s["m.lora_B.weight"] @ s["m.lora_A.weight"] for s, n in zip(states, sizes)
    )
    assert not torch.allclose(prod_of_means, mean_of_prods, atol=1e-3)
    assert server.global_state.keys() == out.keys()
    assert all(torch.equal(server.global_state[k], out[k]) for k in out)  # the engine keeps the new state


def test_weighted_average_keeps_dtype() -> None:
    a = {"x": torch.ones(3, dtype=torch.bfloat16)}
    b = {"x": torch.zeros(3, dtype=torch.bfloat16)}
    out = weighted_average([a, b], [0.25, 0.75])
    assert out["x"].dtype == torch.bfloat16 and torch.allclose(out["x"].float(), torch.full((3,), 0.25))


def test_bad_replies_are_rejected_with_reason() -> None:
    gen = torch.Generator().manual_seed(1)
    good = random_state(gen)
    strategy = FedIT()
    server = Server(strategy, setup_for(good))
    instruction = ClientInstruction(good)
    assert server.validate_reply(instruction, ClientReply(0, random_state(gen), 5)) is None
    wrong_rank = random_state(gen, rank=8)
    assert "rank 8, but the client was given rank 4" in server.validate_reply(
        instruction, ClientReply(0, wrong_rank, 5)
    )
    wrong_shape = {k: v[:, :-1] if "lora_A" in k else v for k, v in random_state(gen).items()}
    assert "shape" in server.validate_reply(instruction, ClientReply(0, wrong_shape, 5))
    nan = random_state(gen)
    nan["m.lora_B.weight"][0, 0] = float("nan")
    assert "non-finite" in server.validate_reply(instruction, ClientReply(0, nan, 5))
    inf = random_state(gen)
    inf["m.lora_A.weight"][1, 1] = float("inf")
    assert "non-finite" in check_same_layout(good, inf)
    missing = {"m.lora_A.weight": good["m.lora_A.weight"]}
    assert "names differ" in server.validate_reply(instruction, ClientReply(0, missing, 5))
    assert "num_examples" in server.validate_reply(instruction, ClientReply(0, good, 0))


def test_proximal_term_is_one_vector_norm_by_hand() -> None:
    theta = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[3.0], [4.0]], requires_grad=True)]
    anchor = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0], [1.0]])]
    mu = 0.5
    # diff = (1, 2, 2, 3); ||diff||^2 = 1 + 4 + 4 + 9 = 18; mu/2 * 18 = 4.5
    term = proximal_term(theta, anchor, mu)
    assert term.item() == 4.5
    term.backward()
    assert theta[0].grad.tolist() == [0.5, 1.0]  # gradient mu * (theta - anchor)
    assert theta[1].grad.tolist() == [[1.0], [1.5]]


def test_proximal_term_on_random_tensors_against_float64() -> None:
    """mu/2 ||theta - theta_g||^2 over the whole adapter; a sum of per-tensor SQUARED norms (OpenFedLLM's
    form) is the same number, a sum of per-tensor norms (unsquared) is not."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(4, 12), (10, 4), (3,)]
    theta = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    anchor = [torch.randn(s, generator=gen) for s in shapes]
    mu = 0.37
    term = proximal_term(theta, anchor, mu)
    flat = torch.cat([(p.detach().double() - a.double()).flatten() for p, a in zip(theta, anchor)])
    expected = 0.5 * mu * float(flat @ flat)
    squared_norms = (
        0.5 * mu * sum(float((p.detach().double() - a.double()).norm() ** 2) for p, a in zip(theta, anchor))
    )
    unsquared = (
        0.5 * mu * sum(float((p.detach().double() - a.double()).norm()) for p, a in zip(theta, anchor))
    )
    assert_rel_close(term, torch.tensor(expected), 1e-6)
    assert abs(squared_norms - expected) <= 1e-9 * expected
    assert abs(term.item() - unsquared) > 0.1 * expected
    term.backward()
    for p, a in zip(theta, anchor):
        assert_rel_close(p.grad, mu * (p.detach().double() - a.double()), 1e-6)


def test_fedprox_sends_mu_to_every_client() -> None:
    strategy = FedProx(FedProxOptions(mu=0.3))
    server = Server(strategy, setup_for({"a": torch.zeros(2)}, clients=6))
    instructions = server.configure(1, [2, 5])
    assert set(instructions) == {2, 5}
    assert all(i.hooks == [ProximalTerm(mu=0.3)] for i in instructions.values())
    assert FedProx.default_optimizer == "sgd" and FedIT.default_optimizer == "adamw"
