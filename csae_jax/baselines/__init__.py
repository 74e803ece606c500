"""The parent rules of the baseline hierarchies CSAE is compared against.

Every rule returns `(parent, strength)` arrays over the level-1 features it groups (parent index,
or -1 when the feature gets none; a strength that orders a concept's members), so
`csae_jax.cascade.hierarchy.build` writes the same `hierarchy.json` for every method:

  coactivation  flat SAEs at n1 and n2: parent = the n2 feature a n1 feature co-fires with most
  matryoshka    Matryoshka groups [n2, n1 - n2]: inner parent by P(inner | outer) or decoder cosine
  stacked       a level-2 SAE on level-1 codes (`CodeSource`); parent = argmax of decoder column
  clustering    agglomerative / spectral / spherical k-means of the unit level-1 decoder rows
"""
