"""vlmfast.cluster: clustering for the spurious-correlation audit, without N x N matrices.

=====================  ===================================================================================
``kmedoids``           exact cosine k-medoids (scikit-learn-extra "alternate" + k-medoids++), matrix-free
``silhouette``         scikit-learn's silhouette score from cluster sums
``sweep``              RaVL's k sweep: fit every k, keep the best silhouette (reference selection rule)
``medoids_of``         the exact medoids of a given clustering
``kmeans``             k-means (spherical by default): FAISS when installed, else the op ``kmeans_assign``
=====================  ===================================================================================
"""

from vlmfast.cluster._kmedoids import (KMedoidsResult, PairCorrections, SweepResult, kmedoids, medoids_of,
                                      silhouette, sweep)
from vlmfast.cluster._kmeans import KMeansResult, kmeans

__all__ = ["KMeansResult", "kmeans", "KMedoidsResult", "PairCorrections", "SweepResult", "kmedoids", "medoids_of", "silhouette", "sweep"]
