"""Mutation check: break README's promises on purpose, one line at a time, and see whether the tests notice.

    python tests/mutate.py                 # every mutation (a quarter of an hour or more on a 2-core CPU)
    python tests/mutate.py --list          # the mutations, the file each edits and whether its target is there
    python tests/mutate.py --only NAME     # one mutation (repeat --only for several)

The repository (its tracked and untracked-but-not-ignored files, without runs/ and data/) is copied to a temporary
folder. First the guard tests of the chosen mutations run there unmutated and must pass (otherwise every mutation
would look caught). Then each mutation replaces one exact target string in one file (a one-line breakage of a
promise: never a syntax error or an import failure), runs its guard tests with the same interpreter
(`pytest -x -q -p no:cacheprovider <node ids>`, cwd the copy) and restores the file. One line per mutation:
`caught by <test>`, `MISSED`, or why it could not be judged (a target no longer in the file, or found more than once;
a pytest run that did not get to its tests): all of these count as not caught. The last line is
`mutations: N caught of M`; the exit status is 0 when at least 90% were caught.

Standard library only. tests/PROMISES.md says which promise each mutation breaks.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR = 0.9


@dataclass(frozen=True)
class Mutation:
    name: str
    section: str     # the README section whose promise it breaks
    file: str | tuple[str, ...]   # relative to the repository root; several: where the code may live (a move)
    target: str      # must occur exactly once, in exactly one of the files
    replacement: str
    guards: tuple[str, ...]   # pytest node ids, run in this order with -x


P, PD, PR = "tests/test_promises.py", "tests/test_promises_data.py", "tests/test_promises_runs.py"
M = "tests/test_memory.py"
L, H = "tests/test_prior_levels.py", "tests/test_hierarchy.py"
Q = "tests/test_quantizer_options.py"
S = "tests/test_search.py"
S4 = f"{S}::test_the_quantizers_search_equals_a_float64_brute_force[True-cosine-4d-lookup-"   # under autocast
T, TR = "tests/test_transformer_prior.py", "tests/test_transformer_runs.py"
CLIP = "tests/test_train.py::test_clip_grad_norm_scales_the_gradients_down_to_the_norm_and_keeps_their_direction"
EMA_GLOO = "tests/test_reliability.py::test_two_gloo_processes_hold_identical_codebooks_and_match_one_process"
VQ_GLOO = "tests/test_reliability.py::test_the_plain_quantizer_on_two_gloo_processes_matches_one_process"
R2, R2R = "tests/test_promises_round2.py", "tests/test_promises_round2_runs.py"
INTERVALS = f"{R2R}::test_the_interval_flags_set_when_records_validations_and_checkpoints_happen"
STEP_FLAGS = f"{R2R}::test_seed_batch_size_and_amp_reach_the_step"
VAL_FRACTION = f"{R2R}::test_val_fraction_and_data_root_reach_the_data"
FILE_TYPES = f"{R2R}::test_every_file_type_readme_names_is_found_in_any_letter_case"
CHANGED_PHOTO = f"{R2R}::test_a_changed_photo_prepares_its_split_again_whatever_else_stays_the_same"
RESUME_FIELDS = f"{R2R}::test_a_resume_that_changes_a_field_that_must_stay_stops_naming_it"
SIGNALS = ("tests/test_reliability.py::"
           "test_sigterm_or_ctrl_c_saves_a_checkpoint_at_the_step_it_stopped_and_says_how_to_resume")
SIGMA = f"{R2R}::test_the_decoder_term_fits_sigma_on_the_training_images_and_scores_the_validation_images"
SIGMA_SUBSET = f"{R2R}::test_the_sigma_fit_takes_evenly_spaced_training_images_holding_at_most_its_pixel_values"
MUTATIONS = [
    # ---- the quantizers' maths (README "The model")
    Mutation("nearest-code-distance", "The model", "codebook.py",
             "table[:num_codes, dim] = codebook.pow(2).sum(1).mul_(-0.5)",
             "table[:num_codes, dim] = codebook.pow(2).sum(1).mul_(-1.0)",
             ("tests/test_models.py::test_nearest_codes_match_brute_force",
              f"{S}::test_nearest_code_equals_a_float64_brute_force")),
    Mutation("search-chunk-drops-a-row", "The model", "codebook.py",
             "n = min(chunk, flat.shape[0] - start)", "n = min(chunk - 1, flat.shape[0] - start)",
             (f"{S}::test_nearest_code_equals_a_float64_brute_force",)),
    Mutation("search-padding-code-can-win", "The model", "codebook.py",
             'table[num_codes:, dim] = float("-inf")', "table[num_codes:, dim] = 0.0",
             (f"{S}::test_nearest_code_equals_a_float64_brute_force",)),
    Mutation("search-lowest-group", "The model", "codebook.py",
             "best_group = s.amax(2).max(1).indices", "best_group = s.amax(2).min(1).indices",
             (f"{S}::test_argmax_in_groups_is_the_first_maximum",)),
    Mutation("search-lowest-in-group", "The model", "codebook.py",
             "best_group].max(1).indices", "best_group].min(1).indices",
             (f"{S}::test_argmax_in_groups_is_the_first_maximum",)),
    Mutation("search-group-stride-off-by-one", "The model", "codebook.py",
             "return best_group * group + best_in_group", "return best_group * (group - 1) + best_in_group",
             (f"{S}::test_argmax_in_groups_is_the_first_maximum",)),
    Mutation("search-index-out-of-range", "The model", "codebook.py",
             "return indices.clamp_(max=num_codes - 1)", "return indices",
             (f"{S}::test_a_non_finite_row_still_gets_a_code",)),
    Mutation("fused-search-bias", "The model", "codebook.py",
             "bias = codebook.pow(2).sum(1).mul_(-0.5)", "bias = codebook.pow(2).sum(1).mul_(-1.0)",
             (f"{S}::test_the_fused_search_equals_a_float64_brute_force",)),
    Mutation("fused-search-drops-a-dimension", "The model", "codebook.py",
             "for j in range(rows.shape[1]):", "for j in range(rows.shape[1] - 1):",
             (f"{S}::test_the_fused_search_equals_a_float64_brute_force",)),
    Mutation("fused-search-answers-no-row", "The model", "codebook.py",
             "torch.where(scores >= best, code_index", "torch.where(scores > best, code_index",
             (f"{S}::test_the_fused_search_equals_a_float64_brute_force",)),
    Mutation("fused-search-chunk-drops-a-row", "The model", "codebook.py",
             "end = min(start + chunk, flat.shape[0])", "end = min(start + chunk - 1, flat.shape[0])",
             (f"{S}::test_the_fused_search_equals_a_float64_brute_force",)),
    Mutation("fused-search-rows-in-bf16", "The model", "codebook.py",
             "rows = torch.zeros(chunk, dim, dtype=torch.float32)",
             "rows = torch.zeros(chunk, dim, dtype=torch.bfloat16)",
             (f"{S}::test_the_fused_search_is_float32_under_bf16_autocast",)),
    Mutation("fused-search-unanswered-rows-kept", "The model", "codebook.py",
             "    if len(missing):", "    if False:",
             (f"{S}::test_a_row_the_fused_search_cannot_answer_gets_the_unfused_searchs_code",)),
    Mutation("fused-search-failure-not-remembered", "The model", "codebook.py",
             '_fused["failed"] = True', '_fused["failed"] = False',
             (f"{S}::test_the_fused_search_falls_back_with_one_warning_when_it_cannot_be_compiled",)),
    Mutation("training-search-not-fused", "The model", "models.py",
             "fused=self.training)", "fused=False)",
             (f"{S}::test_the_training_step_and_only_it_takes_the_fused_search",)),
    Mutation("eval-search-fused", "The model", "models.py",
             "fused=self.training)", "fused=True)",
             (f"{S}::test_the_training_step_and_only_it_takes_the_fused_search",)),
    Mutation("fused-search-in-any-dimension", "The model", "codebook.py",
             "codebook.shape[1] <= FUSED_MAX_DIM", "codebook.shape[1] <= 64",
             (f"{S}::test_the_training_step_and_only_it_takes_the_fused_search",)),
    Mutation("fused-search-size-floor-raised", "The model", "codebook.py",
             "FUSED_MIN_SCORES = 1 << 24", "FUSED_MIN_SCORES = 1 << 26",
             (f"{S}::test_the_fused_search_serves_training_from_a_64_px_batch_of_32_at_the_default_k",)),
    Mutation("fused-search-at-any-size", "The model", "codebook.py",
             "flat.shape[0] * codebook.shape[0] >= FUSED_MIN_SCORES", "flat.shape[0] * codebook.shape[0] >= 0",
             (f"{S}::test_the_training_step_and_only_it_takes_the_fused_search",)),
    Mutation("vq-loss-beta-on-codebook-term", "The model", "models.py",
             "loss = codebook_loss + self.beta * commitment_loss", "loss = self.beta * codebook_loss + commitment_loss",
             ("tests/test_models.py::test_beta_weights_the_commitment_term",)),
    Mutation("straight-through-feeds-the-codebook", "The model", "models.py",
             "return codes.detach() + (flat - flat.detach())", "return codes + (flat - flat.detach())",
             ("tests/test_models.py::test_straight_through_gradient",)),
    Mutation("perplexity-sign", "The model", "codebook.py",
             "torch.exp(-torch.special.xlogy(p, p).sum())", "torch.exp(torch.special.xlogy(p, p).sum())",
             ("tests/test_models.py::test_perplexity_extremes",)),
    Mutation("fsq-rounds-down", "Codebook health", "models.py",
             "rounded = h + (torch.round(h) - h).detach()", "rounded = h + (torch.floor(h) - h).detach()",
             (f"{P}::test_fsq_rounds_each_channel_to_the_nearest_grid_point",)),
    Mutation("fsq-index-rounds-down", "Codebook health", "models.py",
             "digits = (torch.round(h) + self._levels // 2)", "digits = (torch.floor(h) + self._levels // 2)",
             (f"{P}::test_fsq_rounds_each_channel_to_the_nearest_grid_point",)),
    Mutation("vq-search-in-bf16", "The model", "models.py",
             "with torch.autocast(z.device.type, enabled=False):\n            flat, indices, codes = self._search(z)\n"
             "            codebook_loss",
             "with torch.autocast(z.device.type, enabled=True):\n            flat, indices, codes = self._search(z)\n"
             "            codebook_loss",
             (f"{P}::test_search_under_bf16_autocast_equals_float64_brute_force",
              f"{S4}VectorQuantizer]", f"{S4}VectorQuantizerEMA]")),
    Mutation("encode-search-in-bf16", "The model", "models.py",
             "with torch.autocast(z.device.type, enabled=False):\n            return nearest_code(",
             "with torch.autocast(z.device.type, enabled=True):\n            return nearest_code(",
             (f"{P}::test_search_under_bf16_autocast_equals_float64_brute_force",
              f"{S4}VectorQuantizer]", f"{S4}VectorQuantizerEMA]")),
    # ---- the EMA update (README "The model": appendix A.1, "Where this repo differs")
    Mutation("ema-counts-start-at-zero", "The model", "models.py",
             'self.register_buffer("cluster_size", torch.ones(num_embeddings))',
             'self.register_buffer("cluster_size", torch.zeros(num_embeddings))',
             (f"{P}::test_an_unused_code_keeps_its_place_after_one_step_and_after_many",)),
    Mutation("ema-sums-start-at-zero", "The model", "models.py",
             'self.register_buffer("embed_sum", embedding.clone())',
             'self.register_buffer("embed_sum", torch.zeros_like(embedding))',
             (f"{P}::test_an_unused_code_keeps_its_place_after_one_step_and_after_many",)),
    Mutation("laplace-smoothing-without-k", "The model", "models.py",
             "(n + self.num_embeddings * self.eps)", "(n + self.eps)",
             (f"{P}::test_laplace_smoothing_worked_by_hand",)),
    Mutation("ema-decay-weights-the-batch", "The model", "models.py",
             "self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)",
             "self.embed_sum.mul_(self.decay).add_(sums, alpha=self.decay)",
             ("tests/test_models.py::test_ema_single_step_by_hand",)),
    Mutation("ema-updates-in-eval-mode", "The model", "models.py",
             "if self.training:\n                self._ema_update", "if True:\n                self._ema_update",
             ("tests/test_models.py::test_ema_buffers_do_not_change_in_eval_mode",)),
    # ---- codebook health
    Mutation("kmeans-no-iterations", "Codebook health", "codebook.py",
             "iterations: int = 10", "iterations: int = 0",
             (f"{P}::test_kmeans_initialisation_of_the_quantizer_uses_ten_iterations",)),
    Mutation("kmeans-nine-iterations", "Codebook health", "codebook.py",
             "for _ in range(iterations):", "for _ in range(iterations - 1):",
             (f"{P}::test_kmeans_runs_ten_lloyd_iterations",)),
    Mutation("restarts-never", "Codebook health", "models.py",
             "dead = usage < self.restart_threshold", "dead = usage < 0",
             ("tests/test_codebook.py::test_restart_revives_dead_codes_and_resets_their_statistics",)),
    Mutation("cosine-ignored", "Codebook health", "models.py",
             "return l2norm(flat) if self.cosine else flat", "return flat",
             ("tests/test_codebook.py::test_cosine_nearest_codes_match_brute_force_cosine_similarity",
              f"{P}::test_cosine_codes_compare_normalised_inputs_with_normalised_codes")),
    Mutation("spherical-kmeans-not-renormalised", "Codebook health", "codebook.py",
             "if cosine:\n            centres = l2norm(centres)", "if False:\n            centres = l2norm(centres)",
             (f"{P}::test_spherical_kmeans_renormalises_the_centres",)),
    Mutation("default-without-cosine", "Codebook health", "checkpoint.py",
             "cosine: bool = True ", "cosine: bool = False",
             (f"{P}::test_config_defaults_are_the_ones_readme_states",)),
    # ---- several processes
    Mutation("ema-sums-not-added-over-processes", "Several GPUs", "models.py",
             "dist.all_reduce(sums)", "sums = sums",
             ("tests/test_reliability.py::test_two_gloo_processes_hold_identical_codebooks_and_match_one_process",)),
    # ---- the prior's causality
    Mutation("prior-vertical-not-shifted", "Generation", "prior.py",
             "return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]", "return x",
             ("tests/test_prior.py::test_no_blind_spot_every_earlier_position_and_nothing_else[0]",)),
    Mutation("prior-vertical-sees-below", "Generation", "prior.py",
             "F.pad(v, (p, p, p, 0))", "F.pad(v, (p, p, 0, p))",
             ("tests/test_prior.py::test_receptive_field_is_exactly_the_stacks_reach[2-3]",)),
    Mutation("prior-horizontal-sees-right", "Generation", "prior.py",
             "F.pad(h, (self.pad, 0, 0, 0))", "F.pad(h, (0, self.pad, 0, 0))",
             ("tests/test_prior.py::test_receptive_field_is_exactly_the_stacks_reach[2-3]",)),
    Mutation("prior-nll-averaged", "Generation", "prior.py",
             'reduction="none").flatten(1).sum(1)', 'reduction="none").flatten(1).mean(1)',
             ("tests/test_prior.py::test_validation_nll_is_the_mean_cross_entropy",)),
    # ---- the metrics
    Mutation("psnr-20-log10", "Command line", "evaluate.py",
             '"psnr": 10 * math.log10', '"psnr": 20 * math.log10',
             (f"{PR}::test_evaluate_split_of_a_folder[val]",)),
    Mutation("perplexity-of-the-last-batch", "Command line", "evaluate.py",
             'perplexity = [perplexity_from_counts(c).item() for c in counts]',
             'perplexity = [out.vq.perplexity.item() for c in counts]',
             (f"{PR}::test_evaluate_split_of_a_folder[all]",)),
    Mutation("split-train-is-val", "Command line", "evaluate.py",
             '"train": [splits.train]', '"train": [splits.val]',
             (f"{PR}::test_evaluate_split_of_a_folder[train]",)),
    Mutation("evaluate-default-split-is-all", "Command line", "evaluate.py",
             'split = args.split or ("all" if args.data and is_folder else "val")', 'split = args.split or "all"',
             (f"{PR}::test_evaluate_split_of_a_folder[None]",)),
    Mutation("split-all-is-val", "Command line", "evaluate.py",
             '"all": [splits.train, splits.val]', '"all": [splits.val]',
             (f"{PR}::test_evaluate_split_all_of_the_sample_is_training_and_validation_crops",)),
    Mutation("unigram-counted-on-val", "Generation", "evaluate_prior.py",
             'unigram_cross_entropy(codes["train_codes"], val_codes, k)',
             "unigram_cross_entropy(val_codes, val_codes, k)",
             (f"{PR}::test_unigram_baseline_counts_training_maps_and_scores_validation_maps",)),
    Mutation("unigram-unsmoothed", "Generation", "evaluate_prior.py",
             "minlength=num_embeddings).double() + 1.0", "minlength=num_embeddings).double() + 0.0",
             ("tests/test_prior.py::test_unigram_baseline_by_hand",)),
    Mutation("loss-not-normalised", "The model", "train.py",
             "F.mse_loss(out_.reconstruction.float(), x) / variance", "F.mse_loss(out_.reconstruction.float(), x)",
             (f"{PR}::test_the_reconstruction_term_is_the_mse_over_the_training_pixels_variance",)),
    Mutation("variance-of-validation", "The model", "image_data.py",
             "return pixel_variance(self.train)", "return pixel_variance(self.val)",
             (f"{PD}::test_the_variance_is_that_of_the_training_pixels[1024]",)),
    Mutation("variance-is-std", "The model", "image_data.py",
             "return float((counts * (values - mean) ** 2).sum() / (counts.sum() - 1))",
             "return float(((counts * (values - mean) ** 2).sum() / (counts.sum() - 1)).sqrt())",
             (f"{PD}::test_the_variance_is_that_of_the_training_pixels[1024]",)),
    Mutation("variance-drops-a-chunk", "The model", "image_data.py",
             "for x in chunks:   # uint8", "for x in list(chunks)[1:]:   # uint8",
             (f"{M}::test_the_variance_of_images_in_memory_is_numpys",)),
    Mutation("variance-computed-eagerly", "The model", "image_data.py",
             "    description: str\n\n    @functools.cached_property",
             "    description: str\n\n    def __post_init__(self):\n        self.variance\n\n    @functools.cached_property",
             (f"{M}::test_resume_evaluate_and_extract_codes_take_the_checkpoints_variance",)),
    Mutation("variance-read-through-the-memory-map", "The model", "image_data.py",
             "torch.from_numpy(read_rows(dataset.path, rows[i:i + per_chunk], whole.offset, whole.shape[1:]))",
             "torch.from_numpy(np.array(whole[rows[i:i + per_chunk]]))",
             (f"{M}::test_counting_the_variance_holds_no_copy_of_the_split",)),
    Mutation("evaluate-whole-batches", "Command line", "evaluate.py",
             "return images.split(max(1, MODEL_PIXELS // (images.shape[-1] * images.shape[-2])))",
             "return (images,)",
             (f"{M}::test_the_model_sees_a_bounded_number_of_pixels_and_the_metrics_do_not_change",)),
    Mutation("split-in-memory-whatever-the-memory", "Your own images", "prepared.py",
             "if free is None or nbytes <= free / 2:", "if True:",
             (f"{M}::test_a_split_larger_than_half_the_available_memory_stays_on_disk",)),
    # ---- resume and the run folder
    Mutation("resume-forgets-rng", "Command line", "train.py",
             "        restore_rng(resume_from, device)\n    model.train()", "        pass\n    model.train()",
             ("tests/test_train.py::test_resume_continues_exactly",)),
    Mutation("resume-restarts-the-batches", "Command line", "train.py",
             "return batches(train, c.batch_size, c.seed, start_step,",
             "return batches(train, c.batch_size, c.seed, 0,",
             ("tests/test_train.py::test_resume_continues_exactly",)),
    Mutation("resume-takes-the-new-variance", "Command line", "train.py",
             'variance = resume_from["data_variance"]', "variance = data.variance",
             (f"{PR}::test_a_resumed_run_keeps_the_variance_it_started_with",)),
    Mutation("resume-computes-the-variance", "Command line", "train.py",
             "    start_step, elapsed = 0, 0.0\n", "    start_step, elapsed, _ = 0, 0.0, data.variance\n",
             (f"{M}::test_resume_evaluate_and_extract_codes_take_the_checkpoints_variance",)),
    Mutation("resume-ignores-image-size", "Command line", "checkpoint.py",
             '(*MODEL_FIELDS, "data", "image_size", "batch_size", "seed")',
             '(*MODEL_FIELDS, "data", "batch_size", "seed")',
             ("tests/test_cli_errors.py::test_resume_with_a_different_model[--image-size-32]",)),
    Mutation("overwrite-keeps-old-files", "Command line", "runs.py",
             "if overwrite and main:", "if False:",
             (f"{PR}::test_overwrite_removes_the_old_run_files_before_training",)),
    Mutation("overwrite-resumes", "Command line", "runs.py",
             "if ckpt_path.exists() and resume:", "if ckpt_path.exists() and (resume or overwrite):",
             (f"{PR}::test_overwrite_starts_again_from_step_zero",)),
    # ---- safe loading
    Mutation("unsafe-load", "Command line", "runs.py",
             'torch.load(path, map_location="cpu", weights_only=True)',
             'torch.load(path, map_location="cpu", weights_only=False)',
             ("tests/test_reliability.py::test_a_checkpoint_carrying_code_is_refused_without_running_it",)),
    Mutation("mismatch-is-a-traceback", "Command line", "checkpoint.py",
             "except RuntimeError as err:\n        raise CheckpointError(f\"{path}: the weights do not match",
             "except KeyError as err:\n        raise CheckpointError(f\"{path}: the weights do not match",
             (f"{PR}::test_weights_that_do_not_match_their_config_are_one_error_line",)),
    Mutation("non-strict-load", "Command line", "checkpoint.py",
             'model.load_state_dict(ckpt["model"])\n    except RuntimeError',
             'model.load_state_dict(ckpt["model"], strict=False)\n    except RuntimeError',
             (f"{PR}::test_weights_that_do_not_match_their_config_are_one_error_line",)),
    # ---- the data
    Mutation("crop-from-the-corner", "Your own images", ("decode.py", "image_data.py"),
             "top, left = (x.shape[1] - size) // 2, (x.shape[2] - size) // 2", "top, left = 0, 0",
             (f"{PD}::test_centre_crop_of_a_wide_and_a_tall_image",)),
    Mutation("jpeg-decoded-at-full-size", "Your own images", ("decode.py", "image_data.py"),
             'if img.format == "JPEG":', "if False:",
             (f"{PD}::test_a_large_jpeg_is_decoded_at_a_reduced_scale",)),
    Mutation("jpeg-draft-from-the-long-side", "Your own images", ("decode.py", "image_data.py"),
             "ratio = short_side / min(w, h)", "ratio = short_side / max(w, h)",
             (f"{PD}::test_a_large_jpeg_is_decoded_at_a_reduced_scale",)),
    Mutation("split-by-python-hash", "Your own images", "image_data.py",
             'h = int.from_bytes(hashlib.sha1(relative_path.encode("utf-8")).digest()[:8], "big")',
             "h = hash(relative_path) % 2**64",
             (f"{PD}::test_the_split_is_the_same_in_other_processes",)),
    Mutation("extension-case-sensitive", "Your own images", "image_data.py",
             "p.suffix.lower() in IMAGE_EXTENSIONS", "p.suffix in IMAGE_EXTENSIONS",
             ("tests/test_data.py::test_find_images_recursive_case_insensitive_ignores_other_files",)),
    Mutation("alpha-on-black", "Your own images", ("decode.py", "image_data.py"),
             "(255, 255, 255, 255)", "(0, 0, 0, 255)",
             ("tests/test_data.py::test_modes_are_converted_to_rgb_correctly",)),
    Mutation("no-test-folder", "Your own images", "image_data.py",
             'VAL_DIRS = ("val", "valid", "validation", "test")', 'VAL_DIRS = ("val", "valid", "validation")',
             ("tests/test_data.py::test_other_validation_folder_names[test]",)),
    Mutation("cache-limit-in-kib", "Your own images", "image_data.py",
             "<= cache_limit_mb * 2**20", "<= cache_limit_mb * 2**10",
             (f"{PD}::test_what_fits_the_cache_limit_is_decoded_into_memory",)),
    Mutation("sample-strip-in-training", "Your own images", "image_data.py",
             "tops.append(photo[:, :height - image_size].clone())", "tops.append(photo.clone())",
             ("tests/test_data.py::test_sample_holds_out_the_bottom_strip_of_each_tall_enough_training_photo",)),
    # ---- the one-line errors
    Mutation("data-error-is-a-traceback", "Command line", "runs.py",
             "USER_ERRORS = (ConfigError, DataError, CheckpointError)", "USER_ERRORS = (ConfigError, CheckpointError)",
             ("tests/test_cli_errors.py::test_bad_data[missing]",)),
    Mutation("non-finite-loss-ignored", "Command line", ("train.py", "training_loop.py"),
             "if len(bad):", "if False:",
             ("tests/test_reliability.py::"
              "test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint",
              "tests/test_training_loop.py::"
              "test_the_prior_stops_at_a_non_finite_loss_naming_the_step_and_keeps_the_last_good_checkpoint")),
    Mutation("signal-waits-for-the-next-look", "Command line", "training_loop.py",
             "or checkpoint_now or procs.world == 1 and stop_now:", "or checkpoint_now:",
             ("tests/test_training_loop.py::"
              "test_a_signal_stops_at_that_step_with_a_checkpoint_and_the_resume_command",)),
    # ---- generation and the notebook
    Mutation("sample-class-ignored", "Generation", ("sample.py", "prior_checkpoint.py"),
             "return torch.full((num,), classes.index(choice))", "return torch.arange(num) % len(classes)",
             (f"{PR}::test_sample_class_picks_the_class_by_name_or_index",)),
    Mutation("notebook-without-vectorquantizer", "The notebook", "vqvae.ipynb",
             "from models import Encoder, VectorQuantizer, VectorQuantizerEMA, Decoder",
             "from models import Encoder, VectorQuantizerEMA, Decoder",
             (f"{P}::test_notebook_imports_the_four_parts_from_models_and_trains_through_train",)),
    # ---- the transformer prior
    Mutation("transformer-not-causal", "Generation", "transformer_prior.py",
             "attended = F.scaled_dot_product_attention(q, k, v, is_causal=True,",
             "attended = F.scaled_dot_product_attention(q, k, v, is_causal=False,",
             (f"{T}::test_each_position_depends_on_exactly_the_codes_before_it[0]",)),
    Mutation("kv-cache-one-position-too-many", "Generation", "transformer_prior.py",
             "keys[:, :, :t + 1], values[:, :, :t + 1]))", "keys[:, :, :t + 2], values[:, :, :t + 2]))",
             (f"{T}::test_guidance_1_is_the_conditional_prior_and_0_the_unconditional[True]",
              f"{T}::test_the_cached_sampler_draws_what_recomputation_draws[None]")),
    Mutation("guidance-from-the-conditional-logits", "Generation", "transformer_prior.py",
             "logits = without + guidance * (with_class - without)",
             "logits = with_class + guidance * (with_class - without)",
             (f"{T}::test_guidance_1_is_the_conditional_prior_and_0_the_unconditional[True]",
              f"{TR}::test_guidance_0_draws_the_same_maps_for_every_class")),
    Mutation("class-dropout-in-eval-mode", "Generation", "transformer_prior.py",
             "if self.training and self.class_dropout > 0:", "if self.class_dropout > 0:",
             (f"{T}::test_class_dropout_replaces_the_class_in_training_only",)),
    Mutation("class-dropout-never-drops", "Generation", "transformer_prior.py",
             "torch.rand(batch, device=device) < self.class_dropout", "torch.rand(batch, device=device) < 0.0",
             (f"{T}::test_class_dropout_replaces_the_class_in_training_only",)),
    Mutation("top-p-keeps-one-code-too-few", "Generation", "transformer_prior.py",
             "keep_sorted = before < top_p", "keep_sorted = sorted_probs.cumsum(1) < top_p",
             (f"{T}::test_top_k_and_top_p_by_hand",)),
    Mutation("sample-ignores-top-k", "Generation", "sample.py",
             "generator, top_k=top_k, top_p=top_p,", "generator, top_k=0, top_p=top_p,",
             (f"{TR}::test_top_k_1_and_a_tiny_top_p_decode_greedily[shaping0-transformer]",)),
    Mutation("pixelcnn-ignores-top-k-and-top-p", "Generation", "prior.py",
             "probs = filtered_probs(logits, temperature, top_k, top_p)", "probs = filtered_probs(logits, temperature)",
             (f"{TR}::test_top_k_1_and_a_tiny_top_p_decode_greedily[shaping0-pixelcnn]",)),
    Mutation("cfg-on-a-pixelcnn-accepted", "Generation", "sample.py",
             "    if not isinstance(prior, TransformerPrior):", "    if False:",
             (f"{TR}::test_sample_bad_inputs[pixelcnn --cfg 2]",)),
    Mutation("cfg-without-class-dropout-accepted", "Generation", "sample.py",
             "    if prior.class_dropout <= 0:", "    if False:",
             (f"{TR}::test_sample_bad_inputs[no-dropout --cfg 2]",)),
    Mutation("transformer-top-of-two-levels-is-a-pixelcnn", "Generation", "hierarchical_prior.py",
             '        if arch == "transformer":\n            self.top = TransformerPrior(',
             '        if False:\n            self.top = TransformerPrior(',
             (f"{TR}::test_two_level_transformer_top_trains_samples_and_conditions_the_bottom",)),
    # ---- the two-level prior (VQ-VAE-2)
    Mutation("attention-not-causal", "Generation", "prior.py",
             "is_causal=True", "is_causal=False",
             (f"{L}::test_top_prior_with_attention_is_strictly_causal_and_reaches_beyond_the_convolutions",)),
    Mutation("attention-norm-mixes-positions", "Generation", "prior.py",
             "self.qkv(self.norm(x))", "self.qkv(F.layer_norm(x, x.shape[1:]))",
             (f"{L}::test_top_prior_with_attention_is_strictly_causal_and_reaches_beyond_the_convolutions",)),
    Mutation("sampler-skips-attention", "Generation", "prior.py",
             "h = self.attention.step(h, i * width + j, keys, values)", "h = h",
             (f"{L}::test_fast_sampling_with_attention_or_a_conditioning_map_equals_the_naive_sampler[attention]",)),
    Mutation("sampler-conditioning-at-the-corner", "Generation", "prior.py",
             "else bias[l][:, :, i, j])", "else bias[l][:, :, 0, 0])",
             (f"{L}::test_fast_sampling_with_attention_or_a_conditioning_map_equals_the_naive_sampler[map]",)),
    Mutation("bottom-prior-ignores-top", "Generation", "hierarchical_prior.py",
             "self.bottom(bottom, labels, self.conditioning(top))",
             "self.bottom(bottom, labels, self.conditioning(top * 0))",
             (f"{L}::test_bottom_prior_sees_every_top_code_and_only_earlier_bottom_codes",)),
    Mutation("two-level-sampler-ignores-top", "Generation", "hierarchical_prior.py",
             "cond = self.conditioning(top) ", "cond = self.conditioning(top * 0) ",
             (f"{L}::test_two_level_sampling_equals_drawing_top_then_bottom_by_full_recompute",)),
    Mutation("prior-resume-forgets-rng", "Generation", "train_prior.py",
             "        restore_rng(resume_from, device)\n", "        pass\n",
             (f"{L}::test_two_level_run_writes_one_folder_and_resumes_exactly",)),
    Mutation("nll-per-image-bottom-only", "Generation", ("train_prior.py", "prior_checkpoint.py"),
             'out["nll_nats_per_image"] = sum(x * n for x, n in zip(nats, codes_per_map))',
             'out["nll_nats_per_image"] = nats[-1] * codes_per_map[-1]',
             (f"{L}::test_two_level_validation_nll_per_level_and_per_image_by_hand",)),
    Mutation("unigram-per-image-bottom-only", "Generation", "evaluate_prior.py",
             'for level in ("top", "bottom")) for name in ("prior", "unigram")}',
             'for level in ("bottom",)) for name in ("prior", "unigram")}',
             (f"{L}::test_evaluate_prior_reports_each_level_and_the_image",)),
    Mutation("sample-decodes-a-zero-top-map", "Generation", "sample.py",
             "images = vqvae.decode(tuple(c.to(on_vqvae) for c in codes))",
             "images = vqvae.decode((codes[0].to(on_vqvae) * 0, codes[1].to(on_vqvae)))",
             (f"{L}::test_sample_draws_top_then_bottom_and_decodes_the_pair",)),
    Mutation("sample-ignores-levels", "Generation", ("sample.py", "checkpoint.py"),
             "    if vqvae.levels != levels:", "    if False:",
             (f"{L}::test_sample_and_evaluate_with_a_vqvae_of_the_other_kind",)),
    Mutation("prior-resume-ignores-levels", "Generation", "train_prior.py",
             "        if prior_levels(ckpt) != levels:", "        if False:",
             (f"{L}::test_train_prior_given_the_other_kind",)),
    Mutation("bottom-ignores-top", "Two levels", "hierarchy.py",
             "return self.join(torch.cat([h_b, self.top_decoder(e_top)], 1))",
             "return self.join(torch.cat([h_b, 0 * self.top_decoder(e_top)], 1))",
             (f"{H}::test_the_bottom_code_depends_on_the_top_code_and_the_decoder_on_both",)),
    Mutation("decoder-ignores-top", "Two levels", "hierarchy.py",
             "torch.cat([self.upsample_top(e_top), e_bottom], 1)",
             "torch.cat([0 * self.upsample_top(e_top), e_bottom], 1)",
             (f"{H}::test_the_bottom_code_depends_on_the_top_code_and_the_decoder_on_both",)),
    Mutation("top-stacks-ignore-flag", "Two levels", "checkpoint.py",
             'return ("downsample",) if levels == 2 else TOP_FIELDS',
             'return ("downsample", *TOP_FIELDS) if levels == 2 else TOP_FIELDS',
             (f"{H}::test_the_top_follows_its_flags_and_an_older_checkpoint_keeps_its_own",)),
    Mutation("top-codebook-is-the-bottoms", "Two levels", "hierarchy.py",
             "replace(options, num_embeddings=top_num_embeddings or options.num_embeddings)",
             "replace(options, num_embeddings=options.num_embeddings)",
             (f"{H}::test_the_top_follows_its_flags_and_an_older_checkpoint_keeps_its_own",
              f"{H}::test_a_2_level_checkpoint_rebuilds_its_model_and_evaluate_reports_both_codebooks")),
    Mutation("old-checkpoint-loses-top-stacks", "Two levels", "checkpoint.py",
             'd.setdefault("top_residual_blocks", d.get("num_residual_blocks", Config.num_residual_blocks))',
             'd.setdefault("top_residual_blocks", 0)',
             (f"{H}::test_the_top_follows_its_flags_and_an_older_checkpoint_keeps_its_own",
              f"{H}::test_resuming_a_run_from_before_top_residual_blocks_names_the_flag_and_resumes_with_it")),
    Mutation("old-checkpoint-loses-top-codebook", "Two levels", "checkpoint.py",
             "top_num_embeddings: int = 0 ", "top_num_embeddings: int = 512 ",
             (f"{H}::test_the_top_follows_its_flags_and_an_older_checkpoint_keeps_its_own",)),
    Mutation("usage-over-the-bottoms-k", "Two levels", "evaluate.py",
             "counts = [torch.zeros(q.num_embeddings, dtype=torch.float64, device=device) for q in model.quantizers]",
             "counts = [torch.zeros(model.quantizers[-1].num_embeddings, dtype=torch.float64, device=device)\n"
             "              for q in model.quantizers]",
             (f"{H}::test_a_2_level_checkpoint_rebuilds_its_model_and_evaluate_reports_both_codebooks",)),
    Mutation("top-prior-takes-the-bottoms-k", "Generation", ("train_prior.py", "prior_checkpoint.py"),
             "top_num_embeddings=top_num_embeddings)",
             "top_num_embeddings=num_embeddings)",
             (f"{L}::test_evaluate_prior_reports_each_level_and_the_image",)),
    Mutation("unigram-over-the-bottoms-k", "Generation", "evaluate_prior.py",
             "unigram_cross_entropy(train, val, k_level)", "unigram_cross_entropy(train, val, k)",
             (f"{L}::test_evaluate_prior_reports_each_level_and_the_image",)),
    Mutation("resume-ignores-top-stacks", "Two levels", "checkpoint.py",
             'for name in (*MODEL_FIELDS, "data", "image_size", "batch_size", "seed"):',
             'for name in (*(f for f in MODEL_FIELDS if f != "top_residual_blocks"), "data", "image_size",'
             ' "batch_size", "seed"):',
             (f"{H}::test_resuming_a_run_from_before_top_residual_blocks_names_the_flag_and_resumes_with_it",)),
    Mutation("resume-compares-the-top-flag-as-given", "Two levels", "checkpoint.py",
             "if top_codebook_size(saved) == top_codebook_size(current):",
             "if saved.top_num_embeddings == current.top_num_embeddings:",
             (f"{H}::test_the_resume_check_compares_the_top_codebook_sizes_the_flags_give",)),
    Mutation("clip-grad-norm-ignored", "Command line", "train.py",
             "        if c.clip_grad_norm:   #", "        if False:   #", (CLIP,)),
    Mutation("clip-grad-norm-too-tight", "Command line", "train.py",
             "clip_grad_norm_(model.parameters(), c.clip_grad_norm)",
             "clip_grad_norm_(model.parameters(), min(c.clip_grad_norm, 1e-3))", (CLIP,)),
    Mutation("resume-checks-an-absent-top", "Two levels", "checkpoint.py",
             "unused = unused_fields(saved.levels) if saved.levels == current.levels else ()",
             "unused = ()",
             (f"{H}::test_a_1_level_run_resumes_whatever_the_top_flags_say",)),
    Mutation("resume-ignores-the-top-of-two-levels", "Two levels", "checkpoint.py",
             "unused = unused_fields(saved.levels) if saved.levels == current.levels else ()",
             "unused = TOP_FIELDS",
             (f"{H}::test_a_1_level_run_resumes_whatever_the_top_flags_say",)),
    Mutation("fsq-levels-hide-the-top-k", "Two levels", "checkpoint.py",
             'if c.levels == 2 and c.quantizer == "fsq" and c.fsq_levels and c.top_num_embeddings:',
             'if c.levels == 2 and c.quantizer == "fsq" and c.fsq_levels and c.top_num_embeddings < 0:',
             (f"{H}::test_the_top_follows_its_flags_and_an_older_checkpoint_keeps_its_own",)),
    Mutation("usage-is-the-better-level", "Two levels", "evaluate.py",
             '"codebook_usage": min(usage),', '"codebook_usage": max(usage),',
             (f"{H}::test_a_2_level_checkpoint_rebuilds_its_model_and_evaluate_reports_both_codebooks",)),
    Mutation("options-swap-cosine-and-kmeans-init", "The model", "models.py",
             "cosine=o.cosine, lookup_dim=o.lookup_dim, kmeans_init=o.kmeans_init,",
             "cosine=o.kmeans_init, lookup_dim=o.lookup_dim, kmeans_init=o.cosine,",
             (f"{Q}::test_each_option_reaches_the_quantizer_it_builds",)),
    Mutation("ema-eps-not-passed", "The model", "models.py",
             "decay=o.decay, eps=o.eps)", "decay=o.decay)",
             (f"{Q}::test_each_option_reaches_the_quantizer_it_builds",)),
    Mutation("top-takes-the-default-options", "Two levels", "hierarchy.py",
             "top_options = replace(options, num_embeddings=",
             "top_options = replace(QuantizerOptions(), num_embeddings=",
             (f"{Q}::test_each_option_reaches_both_levels_of_the_2_level_model",)),
    Mutation("config-drops-an-option", "Command line", "checkpoint.py",
             'if f.name != "eps")', 'if f.name not in ("eps", "beta"))',
             (f"{Q}::test_a_config_gives_every_option_but_eps_to_the_model_it_builds",)),
    Mutation("build-ignores-levels", "Two levels", "checkpoint.py",
             'if args.pop("levels") == 2:', 'if args.pop("levels") == 3:',
             (f"{H}::test_a_2_level_checkpoint_rebuilds_its_model_and_evaluate_reports_both_codebooks",)),
    # ---- round two: breakages chosen outside the repo that the suite once missed, and their kin
    Mutation("vq-usage-not-added-over-processes", "Several GPUs", "models.py",
             "                    if distributed():\n                        dist.all_reduce(counts)",
             "                    if False:\n                        dist.all_reduce(counts)", (VQ_GLOO,)),
    Mutation("restart-pool-of-this-process-only", "Several GPUs", "models.py",
             "pool = gather_rows(flat)", "pool = flat", (EMA_GLOO,)),
    Mutation("kmeans-init-of-this-process-only", "Several GPUs", "models.py",
             "centres, counts = kmeans(gather_rows(flat),", "centres, counts = kmeans(flat,", (EMA_GLOO,)),
    Mutation("ema-counts-not-added-over-processes", "Several GPUs", "models.py",
             "            dist.all_reduce(counts)\n            dist.all_reduce(sums)",
             "            dist.all_reduce(sums)", (EMA_GLOO,)),
    Mutation("validation-code-counts-not-summed", "Several GPUs", "evaluate.py",
             "for t in (squared_error, *counts, num, ssim_sum):", "for t in (squared_error, num, ssim_sum):",
             (EMA_GLOO,)),
    Mutation("validation-ssim-not-summed", "Several GPUs", "evaluate.py",
             "for t in (squared_error, *counts, num, ssim_sum):", "for t in (squared_error, *counts, num):",
             (EMA_GLOO,)),
    Mutation("vq-search-follows-a-bf16-input", "The model", "models.py",
             "with torch.autocast(z.device.type, enabled=False):\n            flat, indices, codes = self._search(z)\n"
             "            codebook_loss",
             "with torch.autocast(z.device.type, enabled=z.dtype == torch.bfloat16):\n"
             "            flat, indices, codes = self._search(z)\n            codebook_loss",
             (f"{R2}::test_the_quantizer_searches_in_float32_whatever_autocast_and_the_input_dtype",)),
    Mutation("ema-search-follows-a-bf16-input", "The model", "models.py",
             "with torch.autocast(z.device.type, enabled=False):\n            flat, indices, codes = self._search(z)\n"
             "            commitment_loss",
             "with torch.autocast(z.device.type, enabled=z.dtype == torch.bfloat16):\n"
             "            flat, indices, codes = self._search(z)\n            commitment_loss",
             (f"{R2}::test_the_quantizer_searches_in_float32_whatever_autocast_and_the_input_dtype",)),
    Mutation("encode-search-follows-a-bf16-input", "The model", "models.py",
             "with torch.autocast(z.device.type, enabled=False):\n            return nearest_code(",
             "with torch.autocast(z.device.type, enabled=z.dtype == torch.bfloat16):\n            return nearest_code(",
             (f"{R2}::test_the_quantizer_searches_in_float32_whatever_autocast_and_the_input_dtype",)),
    Mutation("vq-codebook-loss-in-bf16", "The model", "models.py",
             "codebook_loss = F.mse_loss(codes, flat.detach())",
             "codebook_loss = F.mse_loss(codes.bfloat16(), flat.detach().bfloat16()).float()",
             (f"{R2}::test_the_quantizer_searches_in_float32_whatever_autocast_and_the_input_dtype",)),
    Mutation("lookup-projection-in-bf16", "The model", "models.py",
             "flat = F.linear(flat, self.project_in.weight.float(), self.project_in.bias.float())",
             "flat = F.linear(flat.bfloat16(), self.project_in.weight.bfloat16(), self.project_in.bias.bfloat16())"
             ".float()",
             (f"{R2}::test_the_quantizer_searches_in_float32_whatever_autocast_and_the_input_dtype",)),
    Mutation("fsq-follows-the-callers-autocast", "The model", "models.py",
             "with torch.autocast(z.device.type, enabled=False):\n            rounded, indices = self._quantize(z)",
             "with torch.autocast(z.device.type, enabled=torch.is_autocast_enabled(z.device.type)):\n"
             "            rounded, indices = self._quantize(z)",
             (f"{R2}::test_fsq_rounds_in_float32_under_bf16_autocast",)),
    Mutation("fsq-encode-follows-the-callers-autocast", "The model", "models.py",
             "with torch.autocast(z.device.type, enabled=False):\n            return self._quantize(z)[1]",
             "with torch.autocast(z.device.type, enabled=torch.is_autocast_enabled(z.device.type)):\n"
             "            return self._quantize(z)[1]",
             (f"{R2}::test_fsq_rounds_in_float32_under_bf16_autocast",)),
    Mutation("restart-takes-the-first-rows", "Codebook health", "models.py",
             "pick = same_everywhere(torch.randint(pool.shape[0], (self.num_embeddings,), device=flat.device))",
             "pick = same_everywhere(torch.arange(self.num_embeddings, device=flat.device) % pool.shape[0])",
             (f"{R2}::test_restarts_move_dead_codes_onto_random_rows_of_the_current_batch",)),
    Mutation("restart-evenly-spaced-rows", "Codebook health", "models.py",
             "pick = same_everywhere(torch.randint(pool.shape[0], (self.num_embeddings,), device=flat.device))",
             "pick = same_everywhere(torch.arange(self.num_embeddings, device=flat.device) * pool.shape[0]"
             " // self.num_embeddings)",
             (f"{R2}::test_restarts_move_dead_codes_onto_random_rows_of_the_current_batch",)),
    Mutation("kmeans-empty-cluster-to-the-origin", "Codebook health", "codebook.py",
             "centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)",
             "centres = sums / counts.clamp_min(1)[:, None]",
             (f"{R2}::test_kmeans_keeps_the_centre_of_an_empty_cluster",)),
    Mutation("vq-usage-decayed-sum", "Codebook health", "models.py",
             "self.usage.mul_(self.usage_decay).add_(counts, alpha=1.0 - self.usage_decay)",
             "self.usage.mul_(self.usage_decay).add_(counts)",
             (f"{R2}::test_usage_is_an_ema_of_the_per_batch_counts_and_a_code_restarts_when_it_falls_below",)),
    Mutation("vq-usage-running-sum", "Codebook health", "models.py",
             "self.usage.mul_(self.usage_decay).add_(counts, alpha=1.0 - self.usage_decay)",
             "self.usage.add_(counts)",
             (f"{R2}::test_usage_is_an_ema_of_the_per_batch_counts_and_a_code_restarts_when_it_falls_below",)),
    Mutation("decay-flag-not-passed-on", "Command line", "models.py",
             "VectorQuantizerEMA(**size, **codebook, decay=o.decay, eps=o.eps)",
             "VectorQuantizerEMA(**size, **codebook, decay=0.99, eps=o.eps)",
             (f"{R2}::test_the_codebook_health_flags_do_what_the_table_says",)),
    Mutation("constant-schedule-skips-the-warm-up", "Command line", "checkpoint.py",
             "    if step < c.warmup_steps:\n        return c.lr * (step + 1) / c.warmup_steps",
             "    if step < c.warmup_steps and c.lr_schedule == \"cosine\":\n"
             "        return c.lr * (step + 1) / c.warmup_steps",
             (f"{R2R}::test_the_warm_up_applies_to_the_constant_schedule_too",)),
    Mutation("log-every-ignored", "Command line", "training_loop.py",
             "log_now = step % cadence.log_every == 0 or evaluate_now", "log_now = True", (INTERVALS,)),
    Mutation("checkpoint-every-ignored", "Command line", "train.py",
             "c.checkpoint_every or c.eval_every), metrics", "c.eval_every), metrics",
             (INTERVALS,)),
    Mutation("checkpoint-every-zero-saves-only-at-the-end", "Command line", "train.py",
             "c.checkpoint_every or c.eval_every), metrics",
             "c.checkpoint_every or c.steps), metrics",
             (INTERVALS,)),
    Mutation("seed-ignored-by-the-weights", "Command line", "train.py",
             "torch.manual_seed(c.seed)", "torch.manual_seed(0)", (STEP_FLAGS,)),
    Mutation("amp-flag-ignored", "Command line", "train.py",
             "amp_dtype = amp_dtype_for(c.amp, device)", "amp_dtype = amp_dtype_for(\"off\", device)", (STEP_FLAGS,)),
    Mutation("batch-size-ignored", "Command line", "train.py",
             "return batches(train, c.batch_size, c.seed, start_step,", "return batches(train, 4, c.seed, start_step,",
             (STEP_FLAGS,)),
    Mutation("val-fraction-ignored", "Your own images", "image_data.py",
             "split_folder(folder, val_fraction)", "split_folder(folder, 0.1)", (VAL_FRACTION,)),
    Mutation("train-ignores-val-fraction", "Your own images", "train.py",
             "build_data(c.data, c.image_size, c.data_root, c.download, c.val_fraction,",
             "build_data(c.data, c.image_size, c.data_root, c.download, 0.1,", (VAL_FRACTION,)),
    Mutation("evaluate-ignores-val-fraction", "Your own images", "evaluate.py",
             "val_fraction=config.val_fraction", "val_fraction=0.1", (VAL_FRACTION,)),
    Mutation("data-root-ignored", "Your own images", "train.py",
             "build_data(c.data, c.image_size, c.data_root, c.download,",
             "build_data(c.data, c.image_size, \"data\", c.download,", (VAL_FRACTION,)),
    Mutation("tif-not-found", "Your own images", "image_data.py",
             '".webp", ".tif", ".tiff")', '".webp", ".tiff")', (FILE_TYPES,)),
    Mutation("jpeg-extension-not-found", "Your own images", "image_data.py",
             '(".jpg", ".jpeg", ".png",', '(".jpg", ".png",', (FILE_TYPES,)),
    Mutation("prepared-key-compares-the-count", "Your own images", "prepared.py",
             'key.get("files") == stamps', 'len(key.get("files")) == len(stamps)', (CHANGED_PHOTO,)),
    Mutation("prepared-key-without-the-time", "Your own images", "prepared.py",
             "st.st_size,\n                       st.st_mtime_ns])", "st.st_size,\n                       0])",
             (CHANGED_PHOTO,)),
    Mutation("prepared-key-without-the-size", "Your own images", "prepared.py",
             "else str(p), st.st_size,", "else str(p), 0,", (CHANGED_PHOTO,)),
    Mutation("resume-ignores-batch-size", "Command line", "checkpoint.py",
             '"image_size", "batch_size", "seed")', '"image_size", "seed")', (RESUME_FIELDS,)),
    Mutation("resume-ignores-seed", "Command line", "checkpoint.py",
             '"batch_size", "seed")', '"batch_size")', (RESUME_FIELDS,)),
    Mutation("resume-ignores-data", "Command line", "checkpoint.py",
             '(*MODEL_FIELDS, "data", "image_size"', '(*MODEL_FIELDS, "image_size"', (RESUME_FIELDS,)),
    Mutation("ctrl-c-not-handled", "Command line", "runs.py",
             "for sig in (signal.SIGINT, signal.SIGTERM):", "for sig in (signal.SIGTERM,):", (SIGNALS,)),
    Mutation("stop-without-a-checkpoint", "Command line", "training_loop.py",
             "                bar.close()\n                hooks.checkpoint(step, final, elapsed)\n"
             "                raise Interrupted",
             "                bar.close()\n                raise Interrupted", (SIGNALS,)),
    Mutation("reconstructions-rows-swapped", "Command line", "train.py",
             "torch.cat([x, reconstruction])", "torch.cat([reconstruction, x])",
             (f"{R2R}::test_reconstructions_png_holds_the_originals_above_their_reconstructions",)),
    Mutation("evaluate-mse-unclamped", "Command line", "evaluate.py",
             "reconstruction = to_image_scale(out.reconstruction)",
             "reconstruction = to_image_scale(out.reconstruction, clamp=False)",
             (f"{R2R}::test_evaluate_scores_reconstructions_clamped_to_0_1",)),
    Mutation("sigma-fitted-on-validation", "Generation", "evaluate_prior.py",
             "subset = torch.utils.data.Subset(splits.train, indices)",
             "subset = torch.utils.data.Subset(splits.val, range(len(splits.val)))", (SIGMA,)),
    Mutation("sigma-fitted-on-both-splits", "Generation", "evaluate_prior.py",
             "subset = torch.utils.data.Subset(splits.train, indices)",
             "subset = torch.utils.data.ConcatDataset([splits.train, splits.val])", (SIGMA,)),
    Mutation("sigma-fit-on-the-first-images", "Generation", "evaluate_prior.py",
             "return [i * len(train) // count for i in range(count)]", "return list(range(count))", (SIGMA_SUBSET,)),
    Mutation("sigma-fit-unbounded", "Generation", "evaluate_prior.py",
             "count = max(1, min(len(train), max_values // values_per_image))", "count = len(train)", (SIGMA_SUBSET,)),
]


def repo_files(root: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files (the working tree as a user would test it), without run
    folders and datasets."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, text=True, check=True).stdout
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [n for n in sorted(set(names)) if not n.startswith(("runs/", "data/", ".git/")) and "__pycache__" not in n
            and (root / n).is_file()]


def copy_repo(root: Path, dest: Path) -> None:
    for name in repo_files(root):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name)


def pytest(copy: Path, node_ids: tuple[str, ...], timeout: float = 600) -> tuple[int, str]:
    """Run the tests in the copy with this interpreter: (exit status, output). Bytecode is never written, so a
    restored file can never be shadowed by the .pyc of its mutated version (same size, same second)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *node_ids],
                           cwd=copy, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    return r.returncode, r.stdout + r.stderr


def first_failure(output: str) -> str:
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return found.group(1) if found else "a failing test"


def locate(root: Path, m: Mutation) -> tuple[Path | None, str | None]:
    """The file the mutation applies to, or why it cannot be applied: its target must occur exactly once, in
    exactly one of its candidate files."""
    files = (m.file,) if isinstance(m.file, str) else m.file
    counts = {f: (root / f).read_text().count(m.target) for f in files if (root / f).is_file()}
    holding = [f for f, n in counts.items() if n]
    if not holding:
        return None, f"STALE: target not found in {' or '.join(files)}"
    if len(holding) > 1 or counts[holding[0]] > 1:
        return None, f"STALE: target found {sum(counts.values())} times in {', '.join(holding)}"
    return root / holding[0], None


def run_one(copy: Path, m: Mutation) -> tuple[bool, str]:
    path, problem = locate(copy, m)
    if problem:
        return False, problem
    original = path.read_text()
    path.write_text(original.replace(m.target, m.replacement))
    try:
        rc, output = pytest(copy, m.guards)
    finally:
        path.write_text(original)
    if rc == 1:
        return True, f"caught by {first_failure(output)}"
    if rc == 0:
        return False, "MISSED"
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    return False, f"NOT JUDGED: pytest exit status {rc} (no test ran to a verdict: {tail[:100]})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and whether their targets exist")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the guards unmutated first")
    args = parser.parse_args(argv)
    names = [m.name for m in MUTATIONS]
    assert len(set(names)) == len(names), "mutation names must be unique"
    chosen = MUTATIONS
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            parser.error(f"unknown mutation(s) {', '.join(unknown)}; --list shows them")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    width = max(len(m.name) for m in chosen)
    if args.list:
        for m in chosen:
            path, problem = locate(ROOT, m)
            where = path.relative_to(ROOT).as_posix() if path else "-"
            print(f"{m.name:{width}s}  {m.section:16s} {where:18s} {problem or 'ok'}  guards: {' '.join(m.guards)}")
        return 0

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vqvae-mutate-") as tmp:
        copy = Path(tmp) / "repo"
        copy.mkdir()
        copy_repo(ROOT, copy)
        if not args.no_baseline:
            guards = tuple(dict.fromkeys(g for m in chosen for g in m.guards))
            rc, output = pytest(copy, guards)
            if rc != 0:
                print(f"baseline: the guard tests fail without any mutation ({first_failure(output)}); "
                      f"fix them first", flush=True)
                print(output[-3000:])
                return 2
            print(f"baseline: {len(guards)} guard tests pass unmutated ({time.perf_counter() - start:.0f} s)",
                  flush=True)
        caught = 0
        for m in chosen:
            t0 = time.perf_counter()
            ok, verdict = run_one(copy, m)
            caught += ok
            print(f"{m.name:{width}s}  {verdict} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"total time {time.perf_counter() - start:.0f} s")
    print(f"mutations: {caught} caught of {len(chosen)}")
    return 0 if caught >= FLOOR * len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
