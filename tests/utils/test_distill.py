"""Top-k distillation: the teacher's logits computed once, the student's only at those token ids."""
import pytest
import torch

import structprune as tp
from structprune.utils.distill import TopKTeacher, distillation_loss, student_topk_logits, topk_kl

transformers = pytest.importorskip("transformers")


def _llama(seed: int = 0):
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _pool(n: int = 5):
    return torch.randint(0, 96, (n, 10), generator=torch.Generator().manual_seed(0))


def test_student_topk_logits_equal_the_full_logits_gathered():
    model, ids = _llama(), _pool(3)
    indices = torch.randint(0, 96, (3, 10, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=ids).logits.gather(-1, indices)
        torch.testing.assert_close(student_topk_logits(model, ids, indices), full, atol=1e-5, rtol=1e-5)


def test_softcapping_is_applied_like_the_model_does():
    model, ids = _llama(), _pool(2)
    model.config.final_logit_softcapping = 0.5
    indices = torch.arange(96).expand(2, 10, 96)
    with torch.no_grad():
        raw = model(input_ids=ids).logits
        torch.testing.assert_close(student_topk_logits(model, ids, indices), torch.tanh(raw / 0.5) * 0.5)


def test_teacher_topk_matches_its_logits_and_the_pool_cycles():
    model, pool = _llama(), _pool(5)
    teacher = TopKTeacher(model, pool, k=4, batch_size=2, dtype=torch.float32)
    with torch.no_grad():
        top = model(input_ids=pool).logits.topk(4, dim=-1)
    torch.testing.assert_close(teacher.values, top.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(teacher.indices, top.indices) and len(teacher) == 5
    ids, values, indices = teacher.batch(2, 2)  # rows 4, 0: the pool wraps around
    assert torch.equal(ids, pool[[4, 0]]) and torch.equal(indices, top.indices[[4, 0]])


def test_kl_is_zero_for_the_teacher_itself_and_trains_a_perturbed_student():
    teacher_model, pool = _llama(), _pool(4)
    with torch.no_grad():  # a peaked teacher: random initialisation alone gives near-uniform distributions
        teacher_model.lm_head.weight.mul_(30)
    teacher = TopKTeacher(teacher_model, pool, k=16, dtype=torch.float32)
    with torch.no_grad():
        assert float(distillation_loss(teacher_model, teacher, 0, 4)) == pytest.approx(0.0, abs=1e-6)
    student = _llama(seed=1)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        optimizer.zero_grad()
        loss = distillation_loss(student, teacher, step, 2)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[0] > 0.01 and min(losses[-3:]) < 0.6 * losses[0]


def test_topk_kl_is_the_renormalised_kl():
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    p = torch.softmax(teacher, -1)
    expected = (p * (torch.log_softmax(teacher, -1) - torch.log_softmax(student, -1))).sum(-1).mean()
    torch.testing.assert_close(topk_kl(student, teacher), expected)


def test_bad_inputs_are_refused_with_what_was_seen():
    model = _llama()
    with pytest.raises(ValueError, match=r"\[sequences, tokens\], got \(10,\)"):
        TopKTeacher(model, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="k=200 exceeds the vocabulary \\(96 logits\\)"):
        TopKTeacher(model, _pool(2), k=200)


def test_exported_as_tp_utils_distill():
    assert tp.utils.distill.TopKTeacher is TopKTeacher
