"""The self-contained DPO demo: a preference data set written in pure Python (`fastalign.demo.pairs`)
so the README's first command needs no download. Import the submodules you need."""
