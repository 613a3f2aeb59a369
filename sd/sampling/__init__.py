"""KSampler semantics: model sampling, sigma schedules, noise, and the samplers."""
