"""The executor's stages, in the order a batch goes through them:

text (:mod:`.text`) -> condition (:mod:`.conditioning`) -> denoise (:mod:`.denoise`, with
:mod:`.experts`) -> decode (:mod:`.decode`); :mod:`.placement` says where their modules run.
"""
