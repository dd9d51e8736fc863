"""``dsv3 eval``: held-out perplexity, Needle in a Haystack, fill-in-the-middle exact match
(docs/design.md §Evaluation)."""
from .fim import FimResult, fim_eval, fim_samples
from .heldout import heldout_documents
from .needle import NeedleResult, make_trial, needle_eval, plot_needle
from .ppl import PplResult, perplexity, plot_nll_by_position

__all__ = ["FimResult", "fim_eval", "fim_samples", "heldout_documents", "NeedleResult", "make_trial",
           "needle_eval", "plot_needle", "PplResult", "perplexity", "plot_nll_by_position"]
