"""gradlens: gradient diagnostics for LLM policy-gradient and SFT losses.

Every loss in scope touches the logits of position t only through the sampled token's
log-prob ℓ_t = log π_θ(y_t), so its logit gradient is c_t·(e_y − π_t) with one scalar c_t per
token. gradlens computes that scalar for each loss, turns it into logit and lm_head gradients,
checks the result against autograd, and reduces it to the numbers a practitioner reads.
"""

__version__ = "0.1.0"
