"""Mixed-precision search against measured engine latency (imports no torch: it is handed callables).

``space`` (what to search), ``budget`` (the latency limit), ``baselines`` (plans to beat, also the warm
start), ``study`` (how to search: Optuna study, sampler, storage).
"""
from __future__ import annotations

from mixq.search import baselines
from mixq.search.budget import Budget
from mixq.search.space import SearchSpace
from mixq.search.study import SAMPLERS, SearchResult, TrialRecord, make_sampler, pareto_front, run_search

__all__ = ["Budget", "SAMPLERS", "SearchResult", "SearchSpace", "TrialRecord", "baselines", "make_sampler",
           "pareto_front", "run_search"]
