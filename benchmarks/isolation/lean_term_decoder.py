"""Isolation experiment for issue 14: a lean term-sequence decoder on the same data and model shape as the
CPU recipe, outside the pipeline, to separate "the method / the scale" from "the pipeline's format".

Sequence = [BOS] + the terms of each training item (5 tokens per item; ``--sep N`` adds N separator
tokens per item), no prompt, no chat template, no GTI, no titles; loss on every term; a from-scratch Qwen3
(2 x 128, head_dim 64, tied embeddings: 1.36M parameters with Beauty's 7.5k terms); constant LR; bf16
autocast. Validation: constrained beam search (10 beams, the project's ``decoding.search`` with
renormalized scores) over every catalog TID, R@10 / N@10 on the same 1,000 seeded validation users as
``train.validation``. Runs for ``--minutes`` of training time, validating every ``--every`` minutes.

    python benchmarks/isolation/lean_term_decoder.py --run <a finished run with prepare/ and sft/> \
        --minutes 20 --every 4 [--lr 1e-3 --dropout 0 --layers 2 --sep 0 --threads 1]

Results (Beauty, 2 vCPU, one process per core): benchmarks/results/quality_isolation_beauty.json.
"""
import time, json, math, argparse
import numpy as np, torch, pyarrow.parquet as pq
from grlm_ray.lib.textformat import training_sequences
from grlm_ray.lib.protocol import select_targets
ap = argparse.ArgumentParser()
ap.add_argument("--run", required=True); ap.add_argument("--minutes", type=float, default=20)
ap.add_argument("--lr", type=float, default=1e-3); ap.add_argument("--dropout", type=float, default=0.0)
ap.add_argument("--batch", type=int, default=64); ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--every", type=float, default=4.0); ap.add_argument("--sep", type=int, default=0)
ap.add_argument("--hidden", type=int, default=128); ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--bf16", type=int, default=1); ap.add_argument("--out", default="lean_curve.json")
a = ap.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(0)
R = a.run
seqs = pq.read_table(f"{R}/prepare/sequences.parquet"); targets = pq.read_table(f"{R}/prepare/targets.parquet")
terms_t = pq.read_table(f"{R}/sft/terms.parquet")
terms = dict(zip(terms_t.column("item_id").to_pylist(), terms_t.column("terms").to_pylist()))
vocab = sorted({w for t in terms.values() for w in t}); wid = {w: i + 3 for i, w in enumerate(vocab)}  # 0 pad 1 bos 2 sep
V = len(vocab) + 3; N = 5
tid_ids = {i: [wid[w] for w in t] for i, t in terms.items()}
train = training_sequences(seqs, targets)
def encode(items):
    out = [1]
    for it in items[-20:]:
        out += tid_ids[it] + [2] * a.sep
    return out
rows = [encode(v) for v in train.values() if len(v) >= 2]
print("rows", len(rows), "tokens/epoch", sum(len(r) for r in rows), "vocab", V, flush=True)
# validation users: the same seeded sample as train.validation (users 1000, seed 0)
by_user = dict(zip(seqs.column("user_id").to_pylist(), seqs.column("item_ids").to_pylist()))
vq = select_targets(targets, "valid", 1000, 0)
val = [(encode(by_user[r["user_id"]][: r["position"]]), r["target_item_id"]) for r in vq]
# trie over TIDs
trie = {}
for i, t in tid_ids.items():
    for k in range(N):
        trie.setdefault(tuple(t[:k]), set()).add(t[k])
trie = {k: sorted(v) for k, v in trie.items()}
trie_np = {k: np.array(v) for k, v in trie.items()}
item_of = {tuple(t): i for i, t in tid_ids.items()}
from transformers import Qwen3Config, Qwen3ForCausalLM
cfg = Qwen3Config(vocab_size=V, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=64, intermediate_size=3 * a.hidden, max_position_embeddings=512, tie_word_embeddings=True,
                  attention_dropout=a.dropout, pad_token_id=0, bos_token_id=1, eos_token_id=2)
model = Qwen3ForCausalLM(cfg)
if a.dropout:
    from grlm_ray.stages.train import add_residual_dropout
    add_residual_dropout(model, a.dropout)
print("params", sum(p.numel() for p in model.parameters()), flush=True)
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
def batch(idx):
    L = max(len(rows[j]) for j in idx)
    x = torch.zeros(len(idx), L, dtype=torch.long); m = torch.zeros(len(idx), L, dtype=torch.long)
    for r, j in enumerate(idx):
        x[r, :len(rows[j])] = torch.tensor(rows[j]); m[r, :len(rows[j])] = 1
    lab = x.clone(); lab[m == 0] = -100; lab[:, 0] = -100
    return x, m, lab
class IdTok:
    """Prompts are space-separated token ids (experiment only)."""
    padding_side = "left"; pad_token = "<pad>"; eos_token = "<sep>"; pad_token_id = 0; eos_token_id = 2
    def __call__(self, texts, return_tensors=None, padding=False, add_special_tokens=False):
        seqs_ = [[int(x) for x in t.split()] for t in texts]
        L = max(len(q) for q in seqs_)
        ids = torch.zeros(len(seqs_), L, dtype=torch.long); m = torch.zeros(len(seqs_), L, dtype=torch.long)
        for r, q in enumerate(seqs_):
            ids[r, L - len(q):] = torch.tensor(q); m[r, L - len(q):] = 1
        class Enc(dict):
            def to(self, d): return self
        return Enc(input_ids=ids, attention_mask=m)
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)
class Keep1(torch.nn.Module):
    def __init__(self, m): super().__init__(); self.m = m; self.device = torch.device("cpu")
    def forward(self, **kw):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(a.bf16)):
            return self.m(**kw, logits_to_keep=1)
from grlm_ray.lib.decoding import TidTrie, TransformersScorer, search
dtrie = TidTrie.build([t for t in tid_ids.values()], 2)
@torch.inference_mode()
def validate(B=10, U=32):
    model.eval(); hits10 = nd10 = 0.0
    scorer = TransformersScorer(Keep1(model), IdTok(), renormalize=True)
    for s in range(0, len(val), U):
        chunk = val[s:s + U]
        res = search(scorer, [" ".join(map(str, c)) for c, _ in chunk], num_beams=B, max_new_tokens=N + 1, trie=dtrie, stop_token_ids=[2])
        for (ctx, tgt), beams in zip(chunk, res):
            ranked = []
            for text, _ in beams:
                t = tuple(int(x) for x in text.split() if x != "2")
                if t in item_of and item_of[t] not in ranked:
                    ranked.append(item_of[t])
            if tgt in ranked[:10]:
                r = ranked.index(tgt); hits10 += 1; nd10 += 1 / math.log2(r + 2)
    model.train()
    return hits10 / len(val), nd10 / len(val)
curve = []; t0 = time.time(); train_s = 0.0; step = 0; epoch = 0; next_val = a.every * 60
rng = np.random.default_rng(0)
order = np.argsort([len(r) for r in rows])
while train_s < a.minutes * 60:
    chunks = [order[s:s + a.batch] for s in range(0, len(order), a.batch)]
    for c in rng.permutation(len(chunks)):
        ts = time.time()
        x, m, lab = batch(chunks[c])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(a.bf16)):
            out = model(input_ids=x, attention_mask=m)
        logits = out.logits[:, :-1].float(); tl = lab[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tl.reshape(-1), ignore_index=-100)
        loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad()
        train_s += time.time() - ts; step += 1
        if step % 50 == 0:
            print(f"step {step} epoch {epoch} loss {loss.item():.3f} train_min {train_s/60:.1f}", flush=True)
        if train_s >= next_val or train_s >= a.minutes * 60:
            tv = time.time(); r10, n10 = validate()
            curve.append({"train_minutes": round(train_s / 60, 2), "epoch": epoch, "step": step, "recall_at_10": r10, "ndcg_at_10": n10})
            print(f"VALID train_min {train_s/60:.1f} epoch {epoch} R@10 {r10:.4f} N@10 {n10:.4f} ({time.time()-tv:.0f}s)", flush=True)
            json.dump(curve, open(a.out, "w")); next_val += a.every * 60
            if train_s >= a.minutes * 60: break
    epoch += 1
