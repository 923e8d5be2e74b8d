"""Demo: a TorchRec DLRM whose large tables are swapped for ROBE-Z, trained on a planted click task.

    python examples/train_dlrm_robe.py --steps 300 --pss "robe:compression=100,chunk_size=8,gradient=dense,min_rows=10000"

Builds ``torchrec.models.dlrm.DLRM`` with an ordinary ``EmbeddingBagCollection``, compresses a copy
with ``torchrec_pss.compress_`` and the ``--pss`` flag (by default the tables with at least 10,000 rows
share one ROBE array at 100x), trains both the compressed and the uncompressed model for the same
steps on the same synthetic batches, and reports log-loss, test AUC and embedding bytes.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torchmetrics.classification import BinaryAUROC
from torchrec import EmbeddingBagCollection
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from torchrec_pss import compress_, parse_compression_flag

TABLE_ROWS = [200_000, 100_000, 20_000, 2_000, 100]
DENSE_FEATURES = 4


class PlantedClicks:
    """Synthetic clicks: one multi-hot bag per table (power-law ids) and a planted logistic model."""

    def __init__(self, rows: list[int], seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.rows = rows
        self.effects = [torch.randn(n, generator=self.generator) for n in rows]
        self.dense_weights = torch.randn(DENSE_FEATURES, generator=self.generator)

    def batch(self, size: int) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
        g = self.generator
        dense = torch.randn(size, DENSE_FEATURES, generator=g)
        values, lengths, logit = [], [], dense @ self.dense_weights
        for n, effect in zip(self.rows, self.effects):
            bag_lengths = torch.randint(1, 4, (size,), generator=g)
            ids = (torch.rand(int(bag_lengths.sum()), generator=g).pow(3) * n).long()
            bags = torch.repeat_interleave(torch.arange(size), bag_lengths)
            logit = logit + torch.zeros(size).index_add_(0, bags, effect[ids]) / bag_lengths
            values.append(ids)
            lengths.append(bag_lengths)
        kjt = KeyedJaggedTensor(
            keys=[f"f{i}" for i in range(len(self.rows))], values=torch.cat(values), lengths=torch.cat(lengths)
        )
        return dense, kjt, torch.bernoulli(torch.sigmoid(2 * logit), generator=g)


def make_model(tables: list[EmbeddingBagConfig], dim: int) -> DLRM:
    return DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables),
        dense_in_features=DENSE_FEATURES,
        dense_arch_layer_sizes=[32, dim],
        over_arch_layer_sizes=[64, 32, 1],
    )


def train(model: DLRM, data: PlantedClicks, test: list, steps: int, batch: int, lr: float, name: str) -> dict:
    optimizer = torch.optim.Adagrad(model.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses = []
    for _ in tqdm(range(steps), desc=name, mininterval=2.0):
        dense, kjt, labels = data.batch(batch)
        loss = loss_fn(model(dense, kjt).squeeze(1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    auroc = BinaryAUROC()
    with torch.no_grad():
        for dense, kjt, labels in test:
            auroc.update(torch.sigmoid(model(dense, kjt).squeeze(1)), labels.long())
    first, last = losses[:20], losses[-20:]
    return {"first_loss": sum(first) / len(first), "last_loss": sum(last) / len(last), "test_auc": auroc.compute().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--pss", default="robe:compression=100,chunk_size=8,gradient=dense,min_rows=10000",
                        help="compression flag (torchrec_pss.flags): <method>:<field>=<value>,...;<table>=...")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=args.dim, num_embeddings=n, feature_names=[f"f{i}"])
        for i, n in enumerate(TABLE_ROWS)
    ]
    baseline = make_model(tables, args.dim)
    compressed = compress_(copy.deepcopy(baseline), parse_compression_flag(args.pss))
    compression = compressed.sparse_arch.embedding_bag_collection.compression

    test_data = PlantedClicks(TABLE_ROWS, args.seed)
    test = [test_data.batch(args.batch) for _ in range(8)]
    results = {}
    for name, model in (("uncompressed", baseline), ("compressed", compressed)):
        data = PlantedClicks(TABLE_ROWS, args.seed)
        data.generator.manual_seed(args.seed + 1)
        results[name] = train(model, data, test, args.steps, args.batch, args.lr, name)
        embedding = model.sparse_arch.embedding_bag_collection
        results[name]["embedding_bytes"] = sum(p.numel() * p.element_size() for p in embedding.parameters())
    print(f"\n--pss {args.pss!r}: compressed tables {sorted(compression)}; {args.steps} steps of {args.batch}")
    print(f"{'model':<16}{'loss first20':>14}{'loss last20':>13}{'test AUC':>10}{'embedding bytes':>17}")
    for name, r in results.items():
        print(f"{name:<16}{r['first_loss']:>14.4f}{r['last_loss']:>13.4f}{r['test_auc']:>10.4f}{r['embedding_bytes']:>17,}")


if __name__ == "__main__":
    main()
