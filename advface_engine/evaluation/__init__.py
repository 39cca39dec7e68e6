"""Evaluation: 10-fold verification, identity-inference attack, reconstruction quality, baselines, report.

    from advface_engine.evaluation import ten_fold_accuracy, psnr, ssim, l1
    mean, std, threshold = ten_fold_accuracy(scores, issame)
"""

from .attack import identity_inference, reconstruct
from .baselines import dp_baseline, dp_epsilon, random_baseline
from .datasets import VerificationSet, folder_set, pairs_from_labels, read_bin, synthetic_set, to_bin, write_bin
from .quality import l1, psnr, reconstruction_quality, ssim
from .verification import best_threshold, cosine_scores, embed, ten_fold_accuracy, verification_accuracy

__all__ = [
    "VerificationSet", "best_threshold", "cosine_scores", "dp_baseline", "dp_epsilon", "embed", "folder_set",
    "identity_inference", "l1", "pairs_from_labels", "psnr", "random_baseline", "read_bin", "reconstruct",
    "reconstruction_quality", "ssim", "synthetic_set", "ten_fold_accuracy", "to_bin", "verification_accuracy",
    "write_bin",
]
