"""Mixed-precision search against measured engine latency (imports no torch: it is handed callables).

``space`` (what to search), ``budget`` (the latency limit), ``baselines`` (plans to beat, also the warm
start), ``study`` (how to search: Optuna study, sampler), ``storage`` (where the study lives, its
fingerprint), ``records`` (what a search looked at).
"""
from __future__ import annotations

from mixq.search import baselines
from mixq.search.budget import Budget
from mixq.search.space import SearchSpace
from mixq.search.records import SearchResult, TrialRecord, best_feasible, best_so_far, pareto_front
from mixq.search.storage import open_storage
from mixq.search.study import SAMPLERS, PlanCache, finished_records, make_sampler, run_search

__all__ = ["Budget", "PlanCache", "SAMPLERS", "SearchResult", "SearchSpace", "TrialRecord", "baselines",
           "best_feasible", "best_so_far", "finished_records", "make_sampler", "open_storage", "pareto_front",
           "run_search"]
