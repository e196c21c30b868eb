"""Evaluation of generated images: FID, KID, multi-scale SWD and prompt retrieval (`edify eval`)."""

from edify.eval.evaluate import METRICS, evaluate, evaluate_pipeline, load_split
from edify.eval.features import InceptionFeatures
from edify.eval.fid import FeatureStats, fid, frechet_distance, kid, reference_stats
from edify.eval.retrieval import retrieval_accuracy
from edify.eval.swd import swd

__all__ = ["METRICS", "FeatureStats", "InceptionFeatures", "evaluate", "evaluate_pipeline", "fid",
           "frechet_distance", "kid", "load_split", "reference_stats", "retrieval_accuracy", "swd"]
