"""Which draft tokens the target keeps, and the token it adds.

Greedy: the longest prefix of the draft that equals the target's argmax, then the target's argmax at
the first mismatch (or after the last draft: the bonus token). The output is then exactly plain
greedy decoding's.

Sampling (Leviathan et al. 2023, Alg. 1; Chen et al. 2023): draft token x_i, drawn from q_i, is kept
with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the replacement is drawn from
norm(max(0, p_i - q_i)); if all k are kept a bonus token is drawn from p_{k+1}. Each emitted token is
then distributed exactly as p, the target's (temperature/top-k/top-p processed) distribution.
"""

from __future__ import annotations

import torch


def greedy_accept(target_tokens: torch.Tensor, draft_tokens: torch.Tensor) -> tuple[int, list[int]]:
    """target_tokens: [n+1] the target's argmax at each verified position; draft_tokens: [n].
    Returns (drafts accepted, the tokens to emit: the accepted drafts then the target's own token)."""
    n = draft_tokens.shape[0]
    matches = (target_tokens[:n] == draft_tokens).long()
    num_accepted = matches.cumprod(0).sum()
    # One host sync per round: the count and the target's tokens travel together.
    values = torch.cat([num_accepted[None], target_tokens]).tolist()
    num_accepted = values[0]
    return num_accepted, values[1:num_accepted + 2]  # accepted drafts equal the target's argmax there


def speculative_sample(p: torch.Tensor, draft_tokens: torch.Tensor, q: torch.Tensor | None,
                       generator: torch.Generator | None = None) -> tuple[int, list[int]]:
    """p: [n+1, V] target probabilities at the verified positions; draft_tokens: [n]; q: [n, V] the draft's
    distributions (None: the drafts were chosen deterministically, q is a point mass on each).
    Returns (drafts accepted, tokens to emit)."""
    n = draft_tokens.shape[0]
    rows = torch.arange(n, device=p.device)
    p_draft = p[rows, draft_tokens]
    if q is None:
        q = torch.zeros_like(p[:n]).scatter_(1, draft_tokens[:, None], 1.0)
    q_draft = q[rows, draft_tokens]
    u = torch.rand(n, generator=generator, device=p.device)
    accepted = (u * q_draft < p_draft).long()  # u < p/q without dividing by a q that may be tiny
    num_accepted = accepted.cumprod(0).sum()
    # Residual distributions for every possible stopping row, then pick the one we stopped at:
    # rows < n: max(0, p - q) (a rejection); row n: p itself (the bonus token after k acceptances).
    residual = torch.cat([(p[:n] - q).clamp_min(0), p[n:n + 1]])
    chosen = residual.index_select(0, num_accepted[None])
    total = chosen.sum(-1, keepdim=True)
    # p == q makes a rejection impossible; guard the division anyway so the row stays a distribution.
    chosen = torch.where(total > 0, chosen / total.clamp_min(1e-30), p.index_select(0, num_accepted[None]))
    extra = torch.multinomial(chosen, 1, generator=generator).squeeze()
    values = torch.cat([num_accepted[None], draft_tokens, extra[None]]).tolist()
    num_accepted = values[0]
    return num_accepted, values[1:1 + num_accepted] + [values[-1]]
