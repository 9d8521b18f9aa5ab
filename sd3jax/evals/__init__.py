"""Evaluation: prompt following on shapes, FID / CLIP-score hooks.

Modules (imported explicitly; numpy + scipy only, no JAX, so evaluation can
run in a separate light process):
  shapes_checker  GenEval-style checker for the shapes data by pixel analysis:
                  detect_objects, score_prompt, score_images, render_prompt
  features        Frechet distance and CLIP score maths, plus "bring a callable"
                  hooks for their feature networks (absent unless configured)
"""
