"""Hot PATE (Cohen et al., 2023): private aggregation of teacher distributions with coordinated sampling."""
