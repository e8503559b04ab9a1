"""Text, models and activations: everything before training.

- :mod:`~polysae.data.sources`: dataset openers (``hf:`` specs, parquet files, their columns);
- :mod:`~polysae.data.corpora`: the bundled labelled corpora and local labelled files;
- :mod:`~polysae.data.chunking`: text -> fixed-length token contexts, with the BOS policy;
- :mod:`~polysae.data.models`: bundled and hub language models behind one interface;
- :mod:`~polysae.data.harvesting`: ``harvest`` / ``HarvestConfig`` (model activations to disk);
- :mod:`~polysae.data.actformat`: the on-disk activation format and its manifest;
- :mod:`~polysae.data.store`: ``ActivationStore`` (harvested activations as training batches) and
  ``LiveActivations``.

Nothing is re-exported here, so importing one of these modules never pulls in the others; the
package-level names (``polysae.harvest``, ``polysae.HarvestConfig``, ``polysae.ActivationStore``)
point at the modules.
"""
