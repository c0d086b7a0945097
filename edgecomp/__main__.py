from edgecomp.cli import main

main()
