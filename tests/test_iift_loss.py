"""The label-positions loss (train.selective_logits) is the model's own loss, value and gradients."""

import pytest


@pytest.mark.parametrize("packed", [False, True])
def test_label_positions_loss_equals_the_models_own_loss_and_gradients(packed):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from grlm_ray.iift import label_positions_lm
    from grlm_ray.tokens import IGNORE, bucket, collate, pack

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.config.use_cache = False
    ids = [[int(x) for x in torch.randint(1, 50, (n,))] for n in (7, 12, 5, 9)]
    labels = [[IGNORE] * (len(x) // 2) + x[len(x) // 2:] for x in ids]
    batches = pack(ids, labels, 32, 0) if packed else bucket(ids, labels, 32, 4)
    batch = collate(batches.table.to_pylist(), packed, 0)
    ref = model(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = label_positions_lm(model)(**batch).loss
    out.backward()
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-6), n


def test_residual_dropout_acts_in_training_only_and_leaves_the_saved_model_plain(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from grlm_ray.iift import add_residual_dropout

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    ids = torch.randint(0, 50, (2, 9))
    model.eval()
    before = model(input_ids=ids).logits
    assert add_residual_dropout(model, 0.3) == 1 + 2 * 2
    assert torch.equal(model(input_ids=ids).logits, before)  # eval: no dropout
    model.train()
    a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(a, b)  # training: two passes differ
    model.save_pretrained(tmp_path)
    model.eval()
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(again(input_ids=ids).logits, before, atol=1e-6)
