"""A tied embedding and LM head (``share_embeddings_and_output_weights``) in one process: one
parameter serves both, its gradient is the sum of both uses, it is counted and checkpointed
once, and a last pipeline stage's copy starts equal to the embedding."""

import pytest
import torch

from megatron_transmamba import flops
from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.models.language_model import TransMambaLanguageModel, count_parameters

pytestmark = pytest.mark.usefixtures("megatron_single_process")

V = 64
SMALL = dict(hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, mamba_num_heads=4,
             mamba_num_groups=2, mamba_head_dim=8, mamba_state_dim=8, seq_length=40,
             ssd_chunk_size=16, use_cpu_initialization=True, layer_pattern="T-*-T-",
             transpoint_schedule="list", transpoint_values=[0, 13])


def config(tied: bool, **kw) -> TransMambaConfig:
    return TransMambaConfig(**SMALL, share_embeddings_and_output_weights=tied, **kw)


def test_the_lm_head_multiplies_by_the_embedding_parameter():
    model = TransMambaLanguageModel(config(True), V, init_seed=1)
    embedding = model.embedding.word_embeddings.weight
    assert model.output_layer.weight is None
    assert model.shared_embedding_or_output_weight() is embedding
    assert "output_layer.weight" not in dict(model.named_parameters())
    assert "output_layer.weight" not in model.state_dict()
    tokens = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        logits = model(tokens)                                       # [B, S, V]
    torch.testing.assert_close(logits, _logits_with_head(model, tokens, embedding))


def _logits_with_head(model, tokens, head: torch.Tensor) -> torch.Tensor:
    """The model's logits recomputed with ``head`` [V, d] as the LM head matrix."""
    captured = []
    handle = model.final_norm.register_forward_hook(lambda m, args, out: captured.append(out))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    return (captured[0] @ head.T).transpose(0, 1)                    # [S, B, d] -> [B, S, V]


def test_gradient_is_the_sum_of_the_embedding_and_lm_head_gradients():
    """The tied model against an untied one whose LM head is set equal to the embedding: same
    loss, and the tied matrix's gradient is the untied embedding's plus its head's."""
    tied = TransMambaLanguageModel(config(True), V, init_seed=1).double()
    untied = TransMambaLanguageModel(config(False), V, init_seed=1).double()
    state = tied.state_dict()
    untied.load_state_dict({**state, "output_layer.weight": state["embedding.word_embeddings.weight"]})
    tokens = torch.randint(0, V, (2, 40))
    labels = torch.roll(tokens, -1, 1)
    losses = [m(tokens, labels=labels).mean() for m in (tied, untied)]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for loss in losses:
        loss.backward()
    both = untied.embedding.word_embeddings.weight.grad + untied.output_layer.weight.grad
    assert untied.output_layer.weight.grad.abs().max() > 1e-3        # both uses contribute
    torch.testing.assert_close(tied.embedding.word_embeddings.weight.grad, both,
                               rtol=0, atol=1e-14)
    grads = {n: p.grad for n, p in untied.named_parameters()}
    for name, param in tied.named_parameters():
        if name != "embedding.word_embeddings.weight":
            torch.testing.assert_close(param.grad, grads[name], rtol=0, atol=1e-14, msg=name)


def test_parameter_count_holds_the_matrix_once():
    d = SMALL["hidden_size"]
    tied = TransMambaLanguageModel(config(True), V)
    untied = TransMambaLanguageModel(config(False), V)
    assert count_parameters(tied) == count_parameters(untied) - V * d
    assert count_parameters(tied) == flops.count_parameters(config(True), V)
    assert flops.non_embedding_parameters(config(True), V) == \
        flops.non_embedding_parameters(config(False), V) == count_parameters(tied) - V * d
    # the head is still a d x V matmul per token
    assert flops.matmul_parameters(config(True), V) == flops.matmul_parameters(config(False), V)


def test_pipeline_stages_hold_a_copy_equal_to_the_embedding():
    """Two stages from the same init_seed: the last stage's copy is drawn as the embedding is
    (bitwise equal), marked shared (counted once, left out of the gradient norm), the chained
    stages give the whole model's loss, and the two copies' gradients add up to the whole
    model's gradient (what finalize_model_grads' embedding-group all-reduce computes)."""
    cfg = config(True)
    whole = TransMambaLanguageModel(cfg, V, init_seed=5)
    first = TransMambaLanguageModel(cfg, V, layer_range=range(0, 2), post_process=False,
                                    init_seed=5)
    last = TransMambaLanguageModel(cfg, V, layer_range=range(2, 6), pre_process=False,
                                   init_seed=5)
    embedding, copy = first.shared_embedding_or_output_weight(), last.output_layer.weight
    assert copy is last.shared_embedding_or_output_weight()
    assert torch.equal(embedding, whole.embedding.word_embeddings.weight)
    assert torch.equal(copy, embedding)
    assert copy.shared and copy.shared_embedding
    assert embedding.shared_embedding and not getattr(embedding, "shared", False)
    assert count_parameters(first) + count_parameters(last) == count_parameters(whole)
    tokens = torch.randint(0, V, (2, 40))
    labels = torch.roll(tokens, -1, 1)
    hidden = first(tokens)
    boundary = hidden.detach().requires_grad_()
    last.set_input_tensor(boundary)
    loss, want = last(tokens, labels=labels).mean(), whole(tokens, labels=labels).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    hidden.backward(boundary.grad)
    want.backward()
    torch.testing.assert_close(embedding.grad + copy.grad,
                               whole.embedding.word_embeddings.weight.grad)


def test_checkpoint_stores_the_matrix_once():
    """sharded_state_dict: one stage holds nothing under output_layer.weight; a last stage's
    copy is a replica (replica_id[0] = 1, not written) of the embedding's key."""
    cfg = config(True)
    whole = TransMambaLanguageModel(cfg, V).sharded_state_dict()
    assert "embedding.word_embeddings.weight" in whole and "output_layer.weight" not in whole
    last = TransMambaLanguageModel(cfg, V, layer_range=range(2, 6),
                                   pre_process=False).sharded_state_dict()
    copy = last["output_layer.weight"]
    assert copy.key == "embedding.word_embeddings.weight" and copy.replica_id[0] == 1
    assert copy.global_shape == (V, SMALL["hidden_size"])


def test_untied_is_the_default():
    model = TransMambaLanguageModel(TransMambaConfig(**SMALL), V)
    assert not model.share_embeddings_and_output_weights
    assert model.output_layer.weight is not model.embedding.word_embeddings.weight
    assert model.output_weight() is None


def test_run_config_model_section_sets_it():
    from megatron_transmamba.training.config import build_run_config
    cfg = build_run_config({"model": {"share_embeddings_and_output_weights": True}})
    assert cfg.model["share_embeddings_and_output_weights"] is True
