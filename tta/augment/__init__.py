"""View sources for view-based methods: conventional crops/flips/AugMix and diffusion variations."""
