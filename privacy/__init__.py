"""Private aggregation of teacher ensembles: shared parts (accounting.py: RDP on opacus; aggregation.py: vote
histograms, GNMax/LNMax, Confident-GNMax with a budget; pate_digits.py: classic PATE vs DP-SGD on sklearn's
digits) and the Hot PATE method package (hot_pate/)."""
