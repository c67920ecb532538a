# Stand-in package file (not upstream code): the upstream __init__ imports modules these tests do not vendor.
